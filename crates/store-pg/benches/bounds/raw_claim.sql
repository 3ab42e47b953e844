UPDATE raw_tasks SET status='claimed', worker='w', token=token+1 WHERE id = (SELECT id FROM raw_tasks WHERE status='queued' ORDER BY priority desc, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id AS tid \gset
UPDATE raw_tasks SET status='done' WHERE id = :tid;
