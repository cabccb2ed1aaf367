"""The job registry's Lua scripts: each runs in Redis as one atomic step (a chunk counted once, a
listing ended, a job finished), so counters stay exact however many workers report at once.

`core.jobs` registers them; the key and argument layout each expects is written above it.
"""

# Every job owns these keys: KEYS[1] the job hash, KEYS[2] its set of finished chunks, KEYS[3] its
# attempts hash; then the shared ACTIVE hash, JOBS_EXPIRING and JOBS_INDEX. `finish` ends a job in
# the same script that changes its state: every key of the job gets EXPIRE(retention), its
# idempotency key is released, and index entries of jobs expired by now are dropped.
FINISH = """
local function prune(now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 1000)
  if #gone > 0 then
    redis.call('ZREM', KEYS[6], unpack(gone))
    redis.call('ZREM', KEYS[5], unpack(gone))
  end
end

local function finish(state, now, retention, error)
  redis.call('HSET', KEYS[1], 'state', state, 'finished_at', now, 'retention_s', retention)
  if error ~= '' then redis.call('HSET', KEYS[1], 'error', error) end
  local id = redis.call('HGET', KEYS[1], 'id')
  local idem = redis.call('HGET', KEYS[1], 'idempotency_key')
  if idem and redis.call('HGET', KEYS[4], idem) == id then redis.call('HDEL', KEYS[4], idem) end
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], retention) end
  if id then redis.call('ZADD', KEYS[5], tonumber(now) + tonumber(retention), id) end
  prune(now)
end

-- the job is done when listing has ended and every chunk is done or cancelled
local function finish_if_complete(now, retention)
  local f = redis.call('HMGET', KEYS[1], 'state', 'listing_done', 'chunks_total', 'chunks_done', 'chunks_cancelled')
  if f[1] == 'running' and f[2] == '1'
     and tonumber(f[4] or 0) + tonumber(f[5] or 0) >= tonumber(f[3] or 0) then
    finish('done', now, retention, '')
  end
end

-- a key of a finished job created or grown after it finished expires with the job
local function follow_job_ttl()
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then
    for i = 2, 3 do
      if redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], ttl) end
    end
  end
end
"""

# Counts a finished chunk once: ARGV[1] chunk id, ARGV[2] now, ARGV[3] retention, then from ARGV[first]
# field/increment pairs: counts (HINCRBY), and the accounting's seconds and cost (`a:` the job's,
# `w:<worker>|` one worker's; HINCRBYFLOAT). A running job whose cost (`a:cost`) reaches its `budget`
# ends `over_budget` here, unless this chunk completed it. 1 when counted now, 0 when it had been
# (or the job is gone).
COUNT_CHUNK = (
    FINISH
    + """
local function count_chunk(first)
  if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
  for i = first, #ARGV, 2 do
    local prefix = string.sub(ARGV[i], 1, 2)
    if prefix == 'a:' or prefix == 'w:' then redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
    else redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
  end
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
  finish_if_complete(ARGV[2], ARGV[3])
  local f = redis.call('HMGET', KEYS[1], 'state', 'budget', 'a:cost')
  local budget, spent = tonumber(f[2] or ''), tonumber(f[3] or '0')
  if f[1] == 'running' and budget and spent >= budget then
    finish('over_budget', ARGV[2], ARGV[3], string.format('spent %.2f of its budget %.2f', spent, budget))
  end
  follow_job_ttl()
  return 1
end
"""
)

# ARGV: chunk id, now, retention, then the field/increment pairs of `count_chunk`.
CHUNK_DONE = COUNT_CHUNK + "return count_chunk(4)\n"

# A delivery of a chunk begins (+1) or ends (-1) in its attempts hash, which expires with a finished
# job. Never below none: an end sent again after its reply was lost leaves no negative count behind.
ATTEMPT_COUNT = """
local function attempt(job, attempts, chunk, increment)
  local n = redis.call('HINCRBY', attempts, chunk, increment)
  if n < 0 then
    redis.call('HSET', attempts, chunk, 0)
    n = 0
  end
  local ttl = redis.call('PTTL', job)
  if ttl > 0 then redis.call('PEXPIRE', attempts, ttl) end
  return n
end
"""

# Latency samples ARGV[first..last] pushed on a list (the newest first), trimmed to `kept`, expiring
# `retention` seconds after this push.
KEEP_SAMPLES = """
local function keep_samples(key, first, last, kept, retention)
  for i = first, last do redis.call('LPUSH', key, ARGV[i]) end
  redis.call('LTRIM', key, 0, tonumber(kept) - 1)
  redis.call('EXPIRE', key, retention)
end
"""

# A worker starts a delivery of a chunk, in one round trip: its attempt counted, the job's start and
# signature set if unset (a job that is gone is not recreated), its queue wait kept for the job and
# its lane. KEYS: job hash, attempts hash, the job's and the lane's queue-wait lists. ARGV: chunk id,
# now, signature, retention, samples kept, then the queue wait (none from an old producer). Returns
# the attempt's number: 1 + the earlier deliveries that died mid-chunk.
BEGIN_CHUNK = (
    ATTEMPT_COUNT
    + KEEP_SAMPLES
    + """
local n = attempt(KEYS[1], KEYS[2], ARGV[1], 1)
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2])
  redis.call('HSETNX', KEYS[1], 'signature', ARGV[3])
end
if #ARGV >= 6 then
  keep_samples(KEYS[3], 6, #ARGV, ARGV[5], ARGV[4])
  keep_samples(KEYS[4], 6, #ARGV, ARGV[5], ARGV[4])
end
return n
"""
)

# A worker ends a delivery whose records are written, in one round trip: the chunk counted once
# (`count_chunk`), its upload-to-record samples kept for the job and its lane only when counted now,
# the rate sample kept, the attempt ended. KEYS: the job's keys (as CHUNK_DONE), then the job's and
# the lane's upload-to-record lists, the rate samples' list. ARGV: chunk id, now, retention, samples
# kept, n, n upload-to-record samples, the rate sample ('' for none), rate samples kept, then the
# field/increment pairs. Returns 1 when counted now.
END_CHUNK = (
    COUNT_CHUNK
    + ATTEMPT_COUNT
    + KEEP_SAMPLES
    + """
local n = tonumber(ARGV[5])
local counted = count_chunk(8 + n)
if counted == 1 and n > 0 then
  keep_samples(KEYS[7], 6, 5 + n, ARGV[4], ARGV[3])
  keep_samples(KEYS[8], 6, 5 + n, ARGV[4], ARGV[3])
end
if ARGV[6 + n] ~= '' then
  -- a lost rate sample costs an estimate a little, never a chunk
  redis.pcall('LPUSH', KEYS[9], ARGV[6 + n])
  redis.pcall('LTRIM', KEYS[9], 0, tonumber(ARGV[7 + n]) - 1)
end
attempt(KEYS[1], KEYS[3], ARGV[1], -1)
return counted
"""
)

# ARGV: now, retention, chunks total
END_LISTING = (
    FINISH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'listing_done', '1', 'chunks_total', ARGV[3], 'updated_at', ARGV[1])
finish_if_complete(ARGV[1], ARGV[2])
return 1
"""
)

# ARGV: state, now, retention, error. Running -> state; 0 when the job was not running.
TRANSITION = (
    FINISH
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
finish(ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return 1
"""
)

# ARGV: now, then (op, field, value) triples; op `+` HINCRBY, `=` HSET, `?` HSETNX. Only a job that
# exists is updated, so a late write never recreates a job that expired.
UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 2, #ARGV, 3 do
  local op, field, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == '+' then redis.call('HINCRBY', KEYS[1], field, value)
  elseif op == '=' then redis.call('HSET', KEYS[1], field, value)
  else redis.call('HSETNX', KEYS[1], field, value) end
end
return 1
"""

# KEYS: job hash. ARGV: how many. Reserves that many chunk numbers of a job fed by several producers
# at once (watchers): the first of them, or -1 when the job is gone.
RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'chunk_seq', ARGV[1]) - ARGV[1]
"""

# KEYS: job hash, attempts hash. ARGV: chunk id, increment.
ATTEMPT = ATTEMPT_COUNT + "return attempt(KEYS[1], KEYS[2], ARGV[1], ARGV[2])\n"

# KEYS: JOBS_EXPIRING, JOBS_INDEX. ARGV: now. Drops index entries of expired jobs.
PRUNE = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
if #gone > 0 then
  redis.call('ZREM', KEYS[2], unpack(gone))
  redis.call('ZREM', KEYS[1], unpack(gone))
end
return #gone
"""

# KEYS: the lane's sorted set of producers (job id -> when it last asked). ARGV: job id, now, the
# time before which a producer is gone, the job hashes' key prefix. Registers the asking producer,
# drops gone producers and jobs no longer sending (ended, or listing done), and answers 1 when the
# asking job's chunks in flight (queued - done - cancelled) divided by its share are the fewest of
# the lane's (a tie is a turn for each). The job hashes are read by name: one Redis, no cluster.
FAIR_TURN = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local loads = {}
local mine, lowest = nil, nil
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local f = redis.call('HMGET', ARGV[4] .. id, 'state', 'listing_done', 'chunks_queued', 'chunks_done',
                       'chunks_cancelled', 'share')
  if f[1] ~= 'running' or f[2] == '1' then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  else
    local share = math.max(tonumber(f[6] or 1) or 1, 1)
    local load = (tonumber(f[3] or 0) - tonumber(f[4] or 0) - tonumber(f[5] or 0)) / share
    loads[id] = load
    if id == ARGV[1] then mine = load end
    if lowest == nil or load < lowest then lowest = load end
  end
end
if mine == nil or mine > lowest then return 0 end
-- a tie goes to the job whose last turn is the oldest, so tied producers alternate whichever polls first
local my_turn = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or 0)
for id, load in pairs(loads) do
  if id ~= ARGV[1] and load == lowest and tonumber(redis.call('HGET', KEYS[2], id) or 0) < my_turn then
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""
