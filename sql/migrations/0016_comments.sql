-- 0016: column comments a DBA reads in psql (\d+) say what is there, in the DBA's words.
--
-- crm_trigger.method called the GET call "the seed format", a word from the project's own
-- history that a DBA cannot know; it now says what the call is.  Comments only: no object,
-- grant or function changes.

COMMENT ON COLUMN crm_bridge.crm_trigger.method IS
    'GET (default): url?AccountID=..., the IDs as query parameters, empty body.  POST: JSON body {"object","event","ids","occurred_at","event_id"}';
