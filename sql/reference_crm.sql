-- The reference CRM schema (`crm-bridge migrate --reference-crm`): customers, cases, case
-- follow-ups and tasks, with the capture triggers attached.  Idempotent.

CREATE SCHEMA IF NOT EXISTS crm;

CREATE TABLE IF NOT EXISTS crm.customer (
    account_id  text PRIMARY KEY,
    name        text NOT NULL,
    email       text,
    phone       text,
    segment     text NOT NULL DEFAULT 'standard',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS crm.case (
    case_id     text PRIMARY KEY,
    account_id  text NOT NULL REFERENCES crm.customer (account_id) ON DELETE CASCADE,
    subject     text NOT NULL,
    status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'pending', 'resolved', 'closed')),
    priority    text NOT NULL DEFAULT 'normal' CHECK (priority IN ('low', 'normal', 'high', 'urgent')),
    channel     text NOT NULL DEFAULT 'phone',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS case_account_idx ON crm.case (account_id);

CREATE TABLE IF NOT EXISTS crm.followup (
    followup_id text PRIMARY KEY,
    case_id     text NOT NULL REFERENCES crm.case (case_id) ON DELETE CASCADE,
    account_id  text NOT NULL REFERENCES crm.customer (account_id) ON DELETE CASCADE,
    author      text NOT NULL,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS followup_case_idx ON crm.followup (case_id);

CREATE TABLE IF NOT EXISTS crm.task (
    task_id     text PRIMARY KEY,
    account_id  text NOT NULL REFERENCES crm.customer (account_id) ON DELETE CASCADE,
    title       text NOT NULL,
    due_at      timestamptz,
    done        boolean NOT NULL DEFAULT false,
    assignee    text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS task_account_idx ON crm.task (account_id);

SELECT crm_bridge.attach('crm.customer', 'customer', ARRAY['account_id']);
SELECT crm_bridge.attach('crm.case',     'case',     ARRAY['account_id', 'case_id']);
SELECT crm_bridge.attach('crm.followup', 'followup', ARRAY['account_id', 'case_id', 'followup_id']);
SELECT crm_bridge.attach('crm.task',     'task',     ARRAY['account_id', 'task_id']);
