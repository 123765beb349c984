-- Settle a job's copy-out once: write the result on the job and append its one `outputs`
-- event, in one step. A second call (a copier whose lease ran out, a duplicate) changes
-- nothing and answers 'duplicate'.
-- KEYS[1] job hash  KEYS[2] events stream  KEYS[3] outputs due (zset)
-- KEYS[4] failed copies (zset)  KEYS[5] copy-out counters (hash)
-- ARGV[1] job id  ARGV[2] 'stored' or 'failed'  ARGV[3] stored outputs (JSON list)
-- ARGV[4] error  ARGV[5] reason code  ARGV[6] now  ARGV[7] events MAXLEN (~)
-- ARGV[8] bytes stored  ARGV[9] keep failed entries this long (s)
local job = KEYS[1]
if redis.call('EXISTS', job) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'missing', ''}
end
local done = redis.call('HGET', job, 'outputs_state')
if done == 'stored' or done == 'failed' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'duplicate', redis.call('HGET', job, 'outputs_event_id') or ''}
end
redis.call('HSET', job, 'outputs_state', ARGV[2], 'stored_outputs', ARGV[3],
  'outputs_error', ARGV[4], 'outputs_reason', ARGV[5], 'outputs_finished_at', ARGV[6])
local event = {'schema', '2', 'type', 'outputs', 'job_id', ARGV[1],
  'batch_id', redis.call('HGET', job, 'batch_id') or '', 'state', ARGV[2],
  'stored', ARGV[3], 'error', ARGV[4], 'reason', ARGV[5], 'finished_at', ARGV[6]}
-- The producer's own key and metadata, as on the job's result event (docs/events.md).
for _, name in ipairs({'idempotency_key', 'metadata'}) do
  local value = redis.call('HGET', job, name)
  if value and value ~= '' then
    table.insert(event, name)
    table.insert(event, value)
  end
end
local event_id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', unpack(event))
redis.call('HSET', job, 'outputs_event_id', event_id)
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[5], ARGV[2], 1)
if ARGV[2] == 'stored' then
  redis.call('HINCRBY', KEYS[5], 'bytes', tonumber(ARGV[8]))
else
  redis.call('HINCRBY', job, 'outputs_attempts', 1)  -- the attempt that ended it
  redis.call('ZADD', KEYS[4], tonumber(ARGV[6]), ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', tonumber(ARGV[6]) - tonumber(ARGV[9]))
end
return {'applied', event_id}
