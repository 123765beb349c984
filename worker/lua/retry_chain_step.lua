-- A failed or cancelled chain step written again as a new job (`kq retry`): the branch it
-- ended reopens, and so does the chain if it had ended (a new run: one more chain event).
-- KEYS[1] chain hash  KEYS[2] chain's job list  KEYS[3] chain's branch ends
-- KEYS[4] the old job  KEYS[5] the new job  KEYS[6] stats hash  KEYS[7] batch hash
-- KEYS[8] batch member list  KEYS[9] poll schedule
-- ARGV[1] new job id  ARGV[2] now  ARGV[3] when the poller checks it
-- Answer: 'new', 'exists' (retried before), 'not_chain_step', 'not_ended', 'chain_gone',
-- 'chain_cancelled' (a chain the user cancelled stays cancelled: no step of it is retried)
if redis.call('EXISTS', KEYS[5]) == 1 then return 'exists' end
local old = redis.call('HMGET', KEYS[4], 'state', 'chain_id', 'step', 'branch', 'request',
  'priority', 'batch_id', 'metadata')
if not old[2] or old[2] == '' then return 'not_chain_step' end
if old[1] ~= 'failed' and old[1] ~= 'cancelled' then return 'not_ended' end
if redis.call('EXISTS', KEYS[1]) == 0 then return 'chain_gone' end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 'chain_cancelled' end
local branch = old[4] or '1'
local ended = redis.call('HGET', KEYS[3], branch)
if not ended or cjson.decode(ended).job_id ~= redis.call('HGET', KEYS[4], 'id') then
  return 'not_ended'  -- this job did not end its branch (the chain was cancelled around it)
end
redis.call('HDEL', KEYS[3], branch)
redis.call('HINCRBY', KEYS[1], 'open', 1)
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  redis.call('HSET', KEYS[1], 'state', 'running')
  redis.call('HDEL', KEYS[1], 'finished_at', 'event_id')
  redis.call('HINCRBY', KEYS[1], 'run', 1)
  redis.call('PERSIST', KEYS[1]); redis.call('PERSIST', KEYS[2]); redis.call('PERSIST', KEYS[3])
end
local id, now, batch_id = ARGV[1], ARGV[2], old[7] or ''
redis.call('HSET', KEYS[5], 'id', id, 'state', 'queued', 'version', 1, 'request', old[5],
  'idempotency_key', 'redrive:' .. redis.call('HGET', KEYS[4], 'id'), 'priority', old[6] or '0',
  'batch_id', batch_id, 'attempts', 0, 'created_at', now, 'updated_at', now,
  'chain_id', old[2], 'step', old[3], 'branch', branch)
if old[8] and old[8] ~= '' then redis.call('HSET', KEYS[5], 'metadata', old[8]) end
redis.call('ZADD', KEYS[9], 'NX', ARGV[3], id)
redis.call('RPUSH', KEYS[2], id)
redis.call('HINCRBY', KEYS[6], 'now:queued', 1)
if batch_id ~= '' then
  redis.call('HINCRBY', KEYS[7], 'total', 1)
  redis.call('HINCRBY', KEYS[7], 'now:queued', 1)
  redis.call('RPUSH', KEYS[8], id)
end
return 'new'
