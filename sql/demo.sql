-- The demo's statements (bridge/devtools/demo.py): first the short day in a contact centre, in
-- the order the demo runs them (each prints as one line: keep them on one line), then its own
-- set-up and read-backs.  Same "-- name:" format as queries.sql.

-- name: new_customer
-- A new customer calls in
INSERT INTO crm.customer (account_id, name, email) VALUES ('ACC-1001', 'Ada Lovelace', 'ada@example.org');

-- name: new_case
-- The agent opens a case for her
INSERT INTO crm.case (case_id, account_id, subject, priority) VALUES ('CASE-501', 'ACC-1001', 'Invoice shows wrong address', 'high');

-- name: new_followup
-- ...adds a follow-up note
INSERT INTO crm.followup (followup_id, case_id, account_id, author, body) VALUES ('FU-9001', 'CASE-501', 'ACC-1001', 'agent.kim', 'Asked for the invoice number');

-- name: new_task
-- ...and a task to call back
INSERT INTO crm.task (task_id, account_id, title, assignee) VALUES ('TASK-77', 'ACC-1001', 'Call Ada back', 'agent.kim');

-- name: customer_email_changes
-- The customer's e-mail address changes
UPDATE crm.customer SET email = 'ada@analytical.engine' WHERE account_id = 'ACC-1001';

-- name: customer_saved_unchanged
-- Someone saves the customer without changing anything (no call)
UPDATE crm.customer SET email = email WHERE account_id = 'ACC-1001';

-- name: case_pending
-- The case moves to pending
UPDATE crm.case SET status = 'pending' WHERE case_id = 'CASE-501';

-- name: task_done
-- The call-back is done
UPDATE crm.task SET done = true WHERE task_id = 'TASK-77';

-- name: followup_removed
-- A note entered by mistake is removed
DELETE FROM crm.followup WHERE followup_id = 'FU-9001';

-- name: task_removed
-- The task list is cleaned up
DELETE FROM crm.task WHERE task_id = 'TASK-77';

-- name: case_removed
-- The case is deleted
DELETE FROM crm.case WHERE case_id = 'CASE-501';

-- name: customer_removed
-- The customer asks to be forgotten
DELETE FROM crm.customer WHERE account_id = 'ACC-1001';

-- name: add_url
-- One URL per (object, event) pair, pointing at the demo's receiver.
INSERT INTO crm_bridge.crm_trigger (object, event, url) VALUES (%(object)s, %(event)s, %(url)s);

-- name: in_flight_count
-- Calls whose outcome is not recorded yet (outcomes are recorded in batches).
SELECT count(*) FROM crm_bridge.delivery WHERE status = 'in_flight';

-- name: status_counts
-- Recorded deliveries by status.
SELECT status, count(*) FROM crm_bridge.delivery GROUP BY 1 ORDER BY 1;
