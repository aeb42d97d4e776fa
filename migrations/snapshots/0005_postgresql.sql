-- Revision 0005 on postgresql: the objects it creates, written out as they were when it was made.
-- Never edit: later revisions change objects in revisions of their own.

ALTER TABLE waiting_followers
    ADD CONSTRAINT pk_waiting_followers PRIMARY KEY (follower_id, scope);

CREATE INDEX ix_waiting_followers_by_leader
    ON waiting_followers (leader_id, scope, occurred, received, follower_id);

CREATE INDEX ix_waiting_followers_unclaimed
    ON waiting_followers (scope, received) WHERE claimed_until IS NULL;

CREATE INDEX ix_waiting_followers_claimed
    ON waiting_followers (scope, claimed_until) WHERE claimed_until IS NOT NULL;
