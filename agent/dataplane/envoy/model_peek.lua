-- sidewatch: the model name and version of a model-scoped Open Inference Protocol call, read from the
-- first request body chunk (agent/protocol/peek.py does the same in Python) and put in dynamic metadata
-- (namespace "sidewatch", keys "model" and "version"), where the gRPC access log picks them up.
--
-- bodyChunks() hands over each chunk as it passes and never buffers the body (body() would wait for all
-- of it); the loop stops at the first chunk, so the rest of the call streams through untouched. A chunk
-- that is too short, compressed or malformed leaves the metadata unset: the call is counted with model
-- "" and never failed. Values are cut to MAX_LABEL bytes; a value with bytes outside printable ASCII is
-- sent hex-encoded under "model_hex" / "version_hex" (dynamic metadata is a protobuf Struct, whose
-- strings must be UTF-8) and decoded by sidewatch as the Python data plane decodes it.
--
-- Inline verdicts (INLINE true: some model is in flag or enforce mode; verdicts.py): Envoy picks a route,
-- and with it whether the verdict filter runs, from the headers, but the model name is in the body. So a
-- ModelInfer call waits here for its whole body (body(): bounded by the route's request_body_buffer_limit,
-- max_message_bytes), and a call of a model whose mode is not shadow gets the INLINE_HEADER header, whose
-- routes enable the verdict filter; the route cache is cleared so that Envoy picks the route again. A
-- client's own copy of the header is removed first from every call. Other calls are not held.
--
-- Query detection (IDENTITY not ""): a call routed inline also gets its client's identity in dynamic metadata
-- ("client", or "client_hex" as above), which Envoy forwards to the verdict server (agent/dataplane/identity.py
-- tells it the same way on the grpc.aio relay): "peer:" and the connection's own remote address without its
-- port (never x-forwarded-for, which the client writes), "certificate:" and the subject of its TLS
-- certificate, or "metadata:" and the value of the IDENTITY_KEY header; without a certificate or that header,
-- its peer address.
--
-- A ModelStreamInfer stream, with query detection on, gets its client's identity in dynamic metadata too: the
-- stream query checks (stream_queries.py) read it for each of its messages.
--
-- Route pins (agent/dataplane/envoy/pins.py): while a model is pinned every route carries "pins" in this
-- filter's route metadata; the gRPC field extraction filter before this one has held the headers until
-- the first message was whole and left its model name in dynamic metadata (model_routing.py). The name
-- then goes into PIN_HEADER (a client's copy removed first, so that no client can pick a pinned route itself) and the route cache is cleared, so that the router matches the
-- pinned model's routes. The peek below cannot do it: its chunk comes after the headers have gone on.
-- With nothing pinned none of this runs.

local MAX_LABEL = __MAX_LABEL__
local INLINE = __INLINE__
local INLINE_HEADER = "__INLINE_HEADER__"
local DEFAULT_MODE = __DEFAULT_MODE__
local MODES = __MODES__      -- the models whose mode is their own (models.<name>.adversarial_mode)
local IDENTITY = __IDENTITY__          -- "", "peer", "certificate" or "metadata"
local IDENTITY_KEY = __IDENTITY_KEY__
local MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
local MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
local PIN_HEADER = "x-sidewatch-model"
local EXTRACTED = "envoy.filters.http.grpc_field_extraction"
local MAX_FIELDS = 16        -- the names are near the front, the tensors are not (as in peek.py)
local PEEK_BYTES = 5 + 2 * (MAX_LABEL + 16)  -- frame header, then fields 1 and 2 with their keys

local MODEL_SCOPED = {
  ["/inference.GRPCInferenceService/ModelInfer"] = true,
  ["/inference.GRPCInferenceService/ModelStreamInfer"] = true,
  ["/inference.GRPCInferenceService/ModelMetadata"] = true,
  ["/inference.GRPCInferenceService/ModelReady"] = true,
}

local function varint(s, pos, last)
  local result, scale = 0, 1
  for _ = 1, 10 do
    if pos > last then return nil, pos end
    local byte = s:byte(pos)
    pos = pos + 1
    result = result + (byte % 128) * scale
    if byte < 128 then return result, pos end
    scale = scale * 128
  end
  return nil, pos
end

-- (name, version) from a gRPC frame's first bytes; nil where the frame cannot be read.
local function peek(s)
  if #s < 5 or s:byte(1) ~= 0 then return nil end  -- too short, or a compressed message
  local length = ((s:byte(2) * 256 + s:byte(3)) * 256 + s:byte(4)) * 256 + s:byte(5)
  local last = math.min(#s, 5 + length)   -- the bytes of this message we hold
  local message_end = 5 + length          -- where the message ends, held or not
  local name, version = "", ""
  local pos = 6
  for _ = 1, MAX_FIELDS do
    if pos > last then break end
    local key
    key, pos = varint(s, pos, last)
    if key == nil then break end
    local field, wire = math.floor(key / 8), key % 8
    if wire == 2 then
      local size
      size, pos = varint(s, pos, last)
      if size == nil or pos + size - 1 > message_end then break end  -- longer than the message: malformed
      if field == 1 or field == 2 then
        local value = s:sub(pos, math.min(pos + size - 1, pos + MAX_LABEL - 1, last))
        if field == 1 then name = value else version = value end
      elseif pos + size - 1 > last then
        break  -- another field runs past what was peeked; the names come first
      end
      pos = pos + size
      if field >= 2 and name ~= "" then break end
    elseif wire == 0 then
      local _
      _, pos = varint(s, pos, last)
      if _ == nil then break end
    elseif wire == 1 then pos = pos + 8
    elseif wire == 5 then pos = pos + 4
    else break end
  end
  return name, version
end

local function put(metadata, key, value)
  if value == "" then return end
  if value:find("[^\32-\126]") then
    metadata:set("sidewatch", key .. "_hex", (value:gsub(".", function(c) return string.format("%02x", c:byte()) end)))
  else
    metadata:set("sidewatch", key, value)
  end
end

-- Who the client is (query detection), as the grpc.aio relay tells it.
local function peer(handle)
  local address = handle:streamInfo():downstreamDirectRemoteAddress() or ""
  return "peer:" .. (address:gsub(":%d+$", ""))
end

local function client(handle)
  if IDENTITY == "certificate" then
    local ssl = handle:connection():ssl()
    local subject = ssl ~= nil and ssl:subjectPeerCertificate() or ""
    if subject ~= "" then return "certificate:" .. subject end
  elseif IDENTITY == "metadata" then
    local value = handle:headers():get(IDENTITY_KEY)
    if value ~= nil and value ~= "" then return "metadata:" .. value end
  end
  return peer(handle)
end

-- ModelInfer with inline verdicts on: the whole body, then the header that picks the verdict routes.
local function route_inline(handle)
  local body = handle:body()
  if body == nil then return end
  local ok, name, version = pcall(peek, body:getBytes(0, math.min(body:length(), PEEK_BYTES)))
  if not ok or name == nil then return end
  local metadata = handle:streamInfo():dynamicMetadata()
  put(metadata, "model", name)
  put(metadata, "version", version)
  local mode = MODES[name] or DEFAULT_MODE
  if mode ~= "shadow" then
    if IDENTITY ~= "" then put(metadata, "client", client(handle)) end
    handle:headers():add(INLINE_HEADER, mode)  -- asked for again: a handle does not outlive body()'s wait
    handle:clearRouteCache()
  end
end

-- A name that can be a header value and was not cut: the pinned routes match it exactly.
local function routable(name)
  return name ~= "" and #name < MAX_LABEL and not name:find("[^\33-\126]")
end

-- The model name the field extraction filter found in the first message, or nil.
local function extracted_model(handle)
  local fields = handle:streamInfo():dynamicMetadata():get(EXTRACTED)
  if fields == nil then return nil end
  local values = fields["model_name"] or fields["name"]
  local name = type(values) == "table" and values[1] or values
  if type(name) == "string" and routable(name) then return name end
  return nil
end

local function route_by_model(handle, headers)
  local changed = headers:get(PIN_HEADER) ~= nil
  headers:remove(PIN_HEADER)
  local name = extracted_model(handle)
  if name ~= nil then
    headers:add(PIN_HEADER, name)
    changed = true
  end
  if changed then handle:clearRouteCache() end
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local path = headers:get(":path")
  -- Pins first: they route by the extracted name at header time. A model both pinned and inline takes the
  -- pinned route (it comes first); its verdict filter does not run (README.md, "The Envoy data plane").
  if handle:metadata():get("pins") then route_by_model(handle, headers) end
  if INLINE then
    if headers:get(INLINE_HEADER) ~= nil then
      -- A client's copy would pick the verdict routes: removed, and the route picked again without it.
      headers:remove(INLINE_HEADER)
      handle:clearRouteCache()
    end
    if path == MODEL_INFER then return route_inline(handle) end
    -- Every message of a stream is checked (stream_queries.py), whatever its model: it needs the client.
    if path == MODEL_STREAM_INFER and IDENTITY ~= "" then
      put(handle:streamInfo():dynamicMetadata(), "client", client(handle))
    end
  end
  if not MODEL_SCOPED[path] then return end
  for chunk in handle:bodyChunks() do
    local size = chunk:length()
    if size > 0 then
      local ok, name, version = pcall(peek, chunk:getBytes(0, math.min(size, PEEK_BYTES)))
      if ok and name ~= nil then
        local metadata = handle:streamInfo():dynamicMetadata()
        put(metadata, "model", name)
        put(metadata, "version", version)
      end
    end
    return  -- the first chunk only: the rest passes through
  end
end
