-- Admission control shared by every worker process through Redis: at most
-- max_in_flight jobs at the provider and max_per_minute submits in any 61 s window
-- (60 s plus a second for clock skew), scaled down after a 429. A submit counts from
-- when its slot was taken until its answer is recorded, then from that answer: never
-- before the provider received it.
-- Waiting jobs sit in per-batch sorted sets (priority, then arrival) served round-robin.
--
-- KEYS[1] slots  KEYS[2] submits  KEYS[3] control  KEYS[4] round-robin  KEYS[5] waiter count
-- KEYS[6] id sequence  KEYS[7] claims   (one WaveSpeed account per Redis; see worker/keys.py)
-- The per-batch waiting lines and job hashes are named from prefixes: ARGV[9], ARGV[10].
-- ARGV[1] op: 'acquire' | 'line_up' | 'claim' | 'wait' | 'penalize' | 'snapshot'
-- ARGV[2] now   ARGV[3] max_in_flight   ARGV[4] max_per_minute   ARGV[5] lease seconds
-- acquire:  ARGV[6] job id  ARGV[7] batch id  ARGV[8] priority
-- line_up:  ARGV[11..] job id, batch id, priority of each job, in turn
-- claim:    ARGV[6] how many at most
-- wait:     ARGV[6] job id  ARGV[7] batch id  ARGV[8] priority
-- penalize: ARGV[6] back-off seconds
-- (ARGV[6..8] are padded with '' where an op takes fewer)
local SLOTS, SUBMITS, CTL = KEYS[1], KEYS[2], KEYS[3]
local RR, NWAIT, SEQ = KEYS[4], KEYS[5], KEYS[6]
local WAIT_PREFIX, JOB_PREFIX = ARGV[9], ARGV[10]
-- Jobs handed to a dispatcher but not yet submitting: if their process dies, they
-- go back in line when this short lease runs out (the transition to submitting ends it).
local CLAIMED, CLAIM_LEASE = KEYS[7], 60
local WINDOW = 61  -- transition.lua repeats it
local op = ARGV[1]
local now = tonumber(ARGV[2])
local max_in_flight = tonumber(ARGV[3])
local max_per_minute = tonumber(ARGV[4])
local lease = tonumber(ARGV[5])

local function factor()
  local f = tonumber(redis.call('HGET', CTL, 'factor') or '1')
  local changed = tonumber(redis.call('HGET', CTL, 'changed_at') or '0')
  -- Gradual return after a 429: +10 % of the limit for every 10 s without one.
  if f < 1 and now - changed >= 10 then
    f = math.min(1, f + 0.1 * math.floor((now - changed) / 10))
    redis.call('HSET', CTL, 'factor', f, 'changed_at', now)
  end
  return f
end

-- Answers 0 when a slot may be taken now, else seconds to wait (0.5 when a release will wake us).
local function blocked()
  redis.call('ZREMRANGEBYSCORE', SLOTS, '-inf', now)  -- expired leases: owners gone
  local until_ = tonumber(redis.call('HGET', CTL, 'backoff_until') or '0')
  if until_ > now then return until_ - now end
  if redis.call('ZCARD', SLOTS) >= max_in_flight then return 0.5 end
  redis.call('ZREMRANGEBYSCORE', SUBMITS, '-inf', now - WINDOW)
  local allowed = math.max(1, math.floor(max_per_minute * factor()))
  if redis.call('ZCARD', SUBMITS) >= allowed then
    local oldest = redis.call('ZRANGE', SUBMITS, 0, 0, 'WITHSCORES')
    return math.max(0.05, tonumber(oldest[2]) + WINDOW - now)
  end
  return 0
end

local function take(job_id)
  redis.call('ZADD', SLOTS, now + lease, job_id)
  -- The submit counts in the window from now; it is named by the attempt it is for
  -- ('<job id>:<attempts + 1>', as the open-attempt entries): the move that leaves
  -- `submitting` moves it on to that time (transition.lua). The provider counts a submit
  -- when its POST arrives, which a busy worker may send a while after this.
  local attempt = tonumber(redis.call('HGET', JOB_PREFIX .. job_id, 'attempts') or '0') + 1
  redis.call('ZADD', SUBMITS, now, job_id .. ':' .. attempt)
  -- Until the job moves to submitting, the slot is only claimed: if the taker dies,
  -- the claim lease returns job and slot to the line (see 'claim').
  redis.call('ZADD', CLAIMED, now + CLAIM_LEASE, job_id)
end

local function enqueue_wait(job_id, batch_id, priority)
  local key = WAIT_PREFIX .. batch_id
  if redis.call('ZSCORE', key, job_id) then return end
  local seq = redis.call('INCR', SEQ)
  -- Higher priority first, then first come first served.
  redis.call('ZADD', key, -priority * 1e12 + seq, job_id)
  redis.call('INCR', NWAIT)
  if redis.call('ZCARD', key) == 1 then redis.call('RPUSH', RR, batch_id) end
end

if op == 'acquire' then
  local job_id = ARGV[6]
  if redis.call('ZSCORE', SLOTS, job_id) then return {'held', '0'} end
  local wait = blocked()
  -- Others waiting go first (fairness): a newcomer joins the queue.
  if wait == 0 and tonumber(redis.call('GET', NWAIT) or '0') > 0 then wait = 0.05 end
  if wait > 0 then
    enqueue_wait(job_id, ARGV[7], tonumber(ARGV[8]))
    return {'wait', tostring(wait)}
  end
  take(job_id)
  return {'granted', '0'}
elseif op == 'line_up' then
  -- Many jobs (a chunk's) at once, when no slot may be granted now (the cap or the rate
  -- is reached, or others wait: they go first): each joins the line as a refused
  -- 'acquire' would put it there, in turn; one already holding a slot (another attempt
  -- of it) is left alone and named, as 'acquire' answers 'held'. Else nothing changes
  -- ('free'): the caller asks job by job.
  local wait = blocked()
  if wait == 0 and tonumber(redis.call('GET', NWAIT) or '0') > 0 then wait = 0.05 end
  if wait == 0 then return {'free', '0'} end
  local answer = {'wait', tostring(wait)}
  for i = 11, #ARGV, 3 do
    if redis.call('ZSCORE', SLOTS, ARGV[i]) then
      table.insert(answer, ARGV[i])
    else
      enqueue_wait(ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]))
    end
  end
  return answer
elseif op == 'wait' then
  redis.call('ZREM', SLOTS, ARGV[6])
  enqueue_wait(ARGV[6], ARGV[7], tonumber(ARGV[8]))
  return {'wait', '0'}
elseif op == 'claim' then
  for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', CLAIMED, '-inf', now, 'LIMIT', 0, 1000)) do
    redis.call('ZREM', CLAIMED, job_id)
    redis.call('ZREM', SLOTS, job_id)
    local f = redis.call('HMGET', JOB_PREFIX .. job_id, 'state', 'batch_id', 'priority')
    if f[1] == 'queued' then enqueue_wait(job_id, f[2] or '', tonumber(f[3] or '0') or 0) end
  end
  local claimed = {}
  local wait = 0
  local rounds = 0
  while #claimed < tonumber(ARGV[6]) and rounds < 10000 do
    rounds = rounds + 1
    wait = blocked()
    if wait > 0 then break end
    local batch_id = redis.call('LMOVE', RR, RR, 'LEFT', 'RIGHT')
    if not batch_id then break end
    local key = WAIT_PREFIX .. batch_id
    local popped = redis.call('ZPOPMIN', key)
    if #popped == 0 then
      redis.call('LREM', RR, 0, batch_id)
    else
      redis.call('DECR', NWAIT)
      if redis.call('ZCARD', key) == 0 then redis.call('LREM', RR, 0, batch_id) end
      take(popped[1])
      table.insert(claimed, popped[1])
    end
  end
  if #claimed == 0 and wait == 0 then wait = 0.5 end
  table.insert(claimed, 1, tostring(wait))
  return claimed
elseif op == 'penalize' then
  local f = factor()
  redis.call('HSET', CTL, 'factor', math.max(0.1, f / 2), 'changed_at', now,
    'backoff_until', now + tonumber(ARGV[6]))
  redis.call('HINCRBY', CTL, 'rate_limited', 1)
  return {'ok', '0'}
elseif op == 'snapshot' then
  redis.call('ZREMRANGEBYSCORE', SUBMITS, '-inf', now - 60)
  return {
    tostring(redis.call('ZCARD', SLOTS)),
    tostring(redis.call('ZCARD', SUBMITS)),
    tostring(redis.call('GET', NWAIT) or '0'),
    tostring(factor()),
    tostring(redis.call('HGET', CTL, 'backoff_until') or '0'),
    tostring(redis.call('HGET', CTL, 'rate_limited') or '0'),
  }
end
return redis.error_reply('unknown op ' .. op)
