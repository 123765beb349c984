-- A copy failed in a way that may pass: note the error and try again at ARGV[2], unless
-- the job's copy-out was settled meanwhile (then its due entry goes).
-- KEYS[1] job hash  KEYS[2] outputs due (zset)  KEYS[3] copy-out counters (hash)
-- ARGV[1] job id  ARGV[2] when to try next  ARGV[3] error  ARGV[4] reason code
-- ARGV[5] '1' when the failure was the provider's download (counts toward the attempts)
local done = redis.call('HGET', KEYS[1], 'outputs_state')
if redis.call('EXISTS', KEYS[1]) == 0 or done == 'stored' or done == 'failed' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return -1
end
redis.call('HSET', KEYS[1], 'outputs_state', 'retrying', 'outputs_error', ARGV[3],
  'outputs_reason', ARGV[4])
local n = redis.call('HINCRBY', KEYS[1], 'outputs_attempts', 1)
if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[1], 'outputs_download_failures', 1) end
redis.call('HINCRBY', KEYS[3], 'retries', 1)
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]), ARGV[1])
return n
