// The server's web page (index.html loads this file). Plain JS, no build step, nothing from
// outside this server.
//
// Two ways to make the avatar talk over the WebSocket /v1/stream (README "Streaming"), drawn on the
// canvas:
//
// - An audio FILE: decoded by the browser (decodeAudioData), resampled to 16 kHz mono by an
//   OfflineAudioContext, streamed at real-time pace (as a text-to-speech engine or a call would
//   deliver it), and played here, each frame shown at its time on the audio clock.
// - The MICROPHONE: captured by an AudioWorklet (ScriptProcessor where there is none), resampled
//   to 16 kHz here, streamed as it is spoken; the newest frame is shown as soon as it arrives.
//
// And a live session over WebRTC (/v1/sessions, "live sessions over WebRTC" below), played by the
// <video>: the server's clock pairs frames and sound, speech is said by the server (a file) or
// comes from this tab's microphone as a WebRTC track, and other tabs can watch the same session.
//
// How the file path keeps sync. Frame k comes with pts = k / fps, its time on the audio's own
// timeline. The page plays the audio itself through Web Audio, starting it at a chosen time T0 on
// the AudioContext clock, so the sound leaving the speakers at any moment is audio time
// a = (the context time being output now) - T0; audibleTime() takes the device's output latency
// out with getOutputTimestamp(). On every screen refresh the page draws the newest frame whose
// pts <= a: the face on screen is the one whose sound is being heard, to within one frame period
// (40 ms at 25 fps) plus one screen refresh. A frame is never shown early; one that arrives after
// its time is counted as late and shown at once (the voice never waits for the video: a stall
// freezes the face, not the sound). Audio is sent by the same AudioContext clock that plays it,
// so the two cannot drift apart.
//
// The latency that is inherent. Frame k's mel window spans the 0.2 s of audio after the frame's
// time (16 mel columns at 80 per second), plus 12.5 ms of STFT half-window: the server can make
// frame k only once the audio reaches k / fps + 0.2125 s, and then generates it, encodes it and
// sends it (its own latency L: tens of ms for one session on a GPU, 100-300 ms on a busy CPU).
// Streaming at real-time pace, frame k therefore arrives about 0.2 s + L after its sound was
// sent. So the page starts the sound when frame 0 arrives, plus a margin for the jitter of L (the
// "Buffer" field, 150 ms unless changed): from the click to the first sound takes about
// 0.2 s + L + 0.15 s, and that start delay is
// the price of sync; the model's 0.2 s look-ahead is a floor no server can go below. Live (the
// microphone), the voice is heard where it is spoken, without delay, so the face lags the voice by
// the same 0.2 s + one message (CHUNK_MS) + L; a listener elsewhere would delay the audio by that
// much, and the pts say exactly which audio each frame belongs to.
"use strict";

const SAMPLE_RATE = 16000;     // the server's PCM: 16 kHz mono, signed 16-bit little-endian
const CHUNK_MS = 40;           // audio per WebSocket message (the server takes 10-500 ms): one frame at 25 fps
const CHUNK = SAMPLE_RATE * CHUNK_MS / 1000;

const token = new URLSearchParams(location.search).get("token");
const el = (id) => document.getElementById(id);
const ui = {
  error: el("error"), avatar: el("avatar"), refresh: el("refresh"), uploadForm: el("upload-form"),
  upload: el("upload"), audioFile: el("audio-file"), buffer: el("buffer"), play: el("play"), mic: el("mic"),
  stop: el("stop"), status: el("status"), canvas: el("screen"),
  counts: {received: el("frames-received"), drawn: el("frames-drawn"), lastIndex: el("last-index"),
           late: el("late-frames"), idle: el("idle-frames"), worstLag: el("worst-lag")},
};
const avatars = new Map();     // avatar id -> its description from GET /v1/avatars
let audioCtx = null;           // one AudioContext for the page (created on the first click)
let active = null;             // the running session (FileSession or MicSession)

// ---- messages to the user ---------------------------------------------------------------------
function errorText(err) {
  return err && err.message ? err.message : String(err);
}

function showError(message, cause) {
  if (cause !== undefined) console.error(message, cause);
  else console.error(message);
  ui.error.textContent = message;
  ui.error.hidden = false;
  setStatus("error", "Stopped: see the error above.");
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function setStatus(state, text) {
  ui.status.dataset.state = state;   // idle, busy, streaming, done, error (the browser tests wait on it)
  ui.status.textContent = text;
}

// Run a click handler; whatever it throws is shown on the page.
function guarded(action) {
  return (event) => {
    if (event) event.preventDefault();
    clearError();
    Promise.resolve().then(action).catch((err) => showError(errorText(err), err));
  };
}

window.addEventListener("error", (e) => showError("Page error: " + e.message));
window.addEventListener("unhandledrejection", (e) => showError(errorText(e.reason), e.reason));

// ---- HTTP API -----------------------------------------------------------------------------------
// Paths are relative to the page, so the server also works behind a proxy under a path prefix.
function serverUrl(path, withToken) {
  const url = new URL(path, document.baseURI);
  if (withToken && token) url.searchParams.set("token", token);
  return url;
}

// fetch() with the token as a Bearer header; an HTTP error becomes an Error with the server's detail.
async function api(path, init = {}) {
  const headers = new Headers(init.headers);
  if (token) headers.set("Authorization", "Bearer " + token);
  let resp;
  try {
    resp = await fetch(serverUrl(path, false), {...init, headers});
  } catch (err) {
    throw new Error(`Cannot reach the server (${path}): ${errorText(err)}`);
  }
  if (!resp.ok) {
    let detail = resp.statusText;
    try { detail = (await resp.json()).detail || detail; } catch (_) { /* not JSON: keep the status text */ }
    throw new Error(`${init.method || "GET"} ${path}: HTTP ${resp.status}: ${detail}`);
  }
  return resp.status === 204 ? null : resp.json();
}

async function refreshAvatars(select) {
  const list = (await api("v1/avatars")).avatars;
  const keep = select || ui.avatar.value;
  avatars.clear();
  ui.avatar.replaceChildren();
  if (!list.length) ui.avatar.append(new Option("(no avatars yet: upload one)", ""));
  for (const a of list) {
    avatars.set(a.avatar_id, a);
    const kind = a.source_kind || "face";
    ui.avatar.append(new Option(`${a.avatar_id} (${kind} ${a.width}x${a.height}, ${plural(a.frames, "frame")} at ${a.fps} fps)`,
                                a.avatar_id));
  }
  if (avatars.has(keep)) ui.avatar.value = keep;
}

async function uploadAvatar() {
  const form = new FormData(ui.uploadForm);
  for (const name of ["box", "fps", "target_face"]) {
    if (!String(form.get(name) || "").trim()) form.delete(name);   // empty: the server's default
  }
  if (!form.get("file") || !form.get("file").size) throw new Error("Choose a photo or video to upload first.");
  setStatus("busy", "Uploading and preparing the avatar (finding the face can take a while)…");
  ui.upload.disabled = true;
  try {
    const info = await api("v1/avatars", {method: "POST", body: form});
    await refreshAvatars(info.avatar_id);
    ui.uploadForm.reset();
    setStatus("idle", `Avatar ${info.avatar_id} is ready (${plural(info.frames, "frame")} at ${info.fps} fps).`);
  } finally {
    ui.upload.disabled = false;
  }
}

// The "Buffer" field: seconds between frame 0's arrival and the start of the sound (file path).
function bufferSeconds() {
  const ms = Number(ui.buffer.value || ui.buffer.placeholder);
  if (!(ms >= 0 && ms <= 10000)) throw new Error("Buffer must be 0 to 10000 ms.");
  return ms / 1000;
}

function chosenAvatar() {
  const info = avatars.get(ui.avatar.value);
  if (!info) throw new Error("Pick an avatar first (or upload one).");
  return info;
}

// ---- audio --------------------------------------------------------------------------------------
async function audioContext() {
  if (!audioCtx) audioCtx = new AudioContext({latencyHint: "interactive"});
  if (audioCtx.state !== "running") await audioCtx.resume();
  return audioCtx;
}

// The AudioContext time of the sound leaving the speakers now (currentTime is when the next block
// is rendered, which is heard an output latency later).
function audibleTime(ctx) {
  if (ctx.getOutputTimestamp) {
    const ts = ctx.getOutputTimestamp();
    if (ts.contextTime > 0 && ts.performanceTime > 0) {
      return ts.contextTime + (performance.now() - ts.performanceTime) / 1000;
    }
  }
  return ctx.currentTime - (ctx.outputLatency || ctx.baseLatency || 0);
}

// Decoded audio -> Float32Array at 16 kHz, mono (the OfflineAudioContext's one output channel
// mixes the channels down, and its resampler is the browser's own).
async function resampleTo16k(buffer) {
  const length = Math.max(1, Math.ceil(buffer.duration * SAMPLE_RATE));
  const offline = new OfflineAudioContext(1, length, SAMPLE_RATE);
  const source = offline.createBufferSource();
  source.buffer = buffer;
  source.connect(offline.destination);
  source.start();
  return (await offline.startRendering()).getChannelData(0);
}

// Float samples in [-1, 1] -> signed 16-bit little-endian PCM bytes.
function pcm16(samples) {
  const out = new DataView(new ArrayBuffer(samples.length * 2));
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    out.setInt16(2 * i, Math.round(s * 32767), true);
  }
  return out.buffer;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function gcd(a, b) {
  while (b) [a, b] = [b, a % b];
  return a;
}

// Streaming band-limited resampler (polyphase windowed sinc) for the microphone path, whose
// samples come at the AudioContext's rate (44.1 or 48 kHz). The low-pass just below the lower of
// the two Nyquist frequencies keeps speech above 8 kHz from folding back into the mel's top bands.
// Output sample n is at input position n * inRate / outRate; before the first input sample and
// after the last (flush) the signal is taken as zero.
class Resampler {
  constructor(inRate, outRate) {
    const g = gcd(Math.round(inRate), Math.round(outRate));
    this.up = Math.round(outRate) / g;       // output n sits at input position n * down / up
    this.down = Math.round(inRate) / g;
    const ratio = inRate / outRate;
    const cutoff = 0.46 / Math.max(1, ratio); // cycles per input sample
    this.half = Math.ceil(10 * Math.max(1, ratio)); // input samples each side of a position
    this.phases = [];                        // one kernel per fractional position (q / up)
    for (let q = 0; q < this.up; q++) {
      const kernel = new Float32Array(2 * this.half);
      let sum = 0;
      for (let k = 0; k < kernel.length; k++) {
        const d = k - this.half + 1 - q / this.up;   // distance from the position, input samples
        const x = 2 * cutoff * d;
        const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
        const blackman = 0.42 + 0.5 * Math.cos(Math.PI * d / this.half) + 0.08 * Math.cos(2 * Math.PI * d / this.half);
        kernel[k] = Math.abs(d) < this.half ? sinc * blackman : 0;
        sum += kernel[k];
      }
      for (let k = 0; k < kernel.length; k++) kernel[k] /= sum;   // unit gain at 0 Hz
      this.phases.push(kernel);
    }
    this.buf = new Float32Array(this.half);  // the zeros before the first sample
    this.bufStart = -this.half;              // input index of buf[0]
    this.total = 0;                          // input samples pushed
    this.n = 0;                              // next output sample
  }

  // Add input samples; returns the output samples (Float32Array) they complete.
  push(samples) {
    const grown = new Float32Array(this.buf.length + samples.length);
    grown.set(this.buf);
    grown.set(samples, this.buf.length);
    this.buf = grown;
    this.total += samples.length;
    return this._produce(Infinity);
  }

  // The end of the input: the remaining output samples (the input's length at the output rate).
  flush() {
    const end = Math.ceil(this.total * this.up / this.down);
    const grown = new Float32Array(this.buf.length + this.half + 1);
    grown.set(this.buf);
    this.buf = grown;                        // zeros after the last sample
    const out = this._produce(end, this.total + this.half + 1);
    this.total = this.bufStart + this.buf.length;
    return out;
  }

  _produce(limit, available = this.total) {
    const out = [];
    while (this.n < limit) {
      const num = this.n * this.down;
      const base = Math.floor(num / this.up);
      if (base + this.half >= available) break;    // needs input not here yet
      const kernel = this.phases[num % this.up];
      const first = base - this.half + 1 - this.bufStart;
      let acc = 0;
      for (let k = 0; k < kernel.length; k++) acc += kernel[k] * this.buf[first + k];
      out.push(acc);
      this.n++;
    }
    const keep = Math.floor(this.n * this.down / this.up) - this.half + 1;   // the oldest input still needed
    if (keep > this.bufStart) {
      this.buf = this.buf.slice(keep - this.bufStart);
      this.bufStart = keep;
    }
    return Float32Array.from(out);
  }
}

// ---- the picture ------------------------------------------------------------------------------
// worstLag: of the frames that arrived in time, the largest gap between the moment a frame was first
// shown and the moment its sound began (file path), ms
const stats = {received: 0, drawn: 0, lastIndex: -1, late: 0, idle: 0, worstLag: null};

function resetStats() {
  Object.assign(stats, {received: 0, drawn: 0, lastIndex: -1, late: 0, idle: 0, worstLag: null});
  showStats();
}

function showStats() {
  ui.counts.received.textContent = stats.received;
  ui.counts.drawn.textContent = stats.drawn;
  ui.counts.lastIndex.textContent = stats.lastIndex < 0 ? "-" : stats.lastIndex;
  ui.counts.late.textContent = stats.late;
  ui.counts.idle.textContent = stats.idle;
  ui.counts.worstLag.textContent = stats.worstLag === null ? "-" : `${stats.worstLag.toFixed(0)} ms`;
}

let onScreen = null;   // the frame drawn last (its bitmap is closed when the next one replaces it)

// Draw one frame ({bitmap, index, pts, idle}) on the canvas.
function draw(frame) {
  const canvas = ui.canvas;
  if (canvas.width !== frame.bitmap.width || canvas.height !== frame.bitmap.height) {
    canvas.width = frame.bitmap.width;
    canvas.height = frame.bitmap.height;
  }
  canvas.getContext("2d").drawImage(frame.bitmap, 0, 0);
  if (onScreen && onScreen !== frame) onScreen.bitmap.close();
  onScreen = frame;
  stats.drawn++;
  if (!frame.idle) stats.lastIndex = frame.index;
  showStats();
}

// ---- the stream -------------------------------------------------------------------------------
// One WebSocket stream: PCM messages out; {"type": "frame" | "idle"} headers, each followed by its
// JPEG, then {"type": "end"} or {"type": "error"} in. Frames are decoded in parallel and handed to
// onFrame in order; onEnd and onError come after every frame before them.
class LipSyncStream {
  constructor(avatarId, handlers) {
    this.avatarId = avatarId;
    this.handlers = handlers;   // onFrame(frame), onEnd(message), onError(Error)
    this.header = null;
    this.chain = Promise.resolve();
    this.finished = false;      // the end, an error, or our own close: nothing more to report
  }

  // Connect; resolves when the stream is open, rejects with what the server said (or why not).
  open() {
    const url = serverUrl("v1/stream", true);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("avatar_id", this.avatarId);
    return new Promise((resolve, reject) => {
      let opened = false;
      const ws = new WebSocket(url);
      ws.binaryType = "blob";
      this.ws = ws;
      ws.onopen = () => { opened = true; resolve(); };
      ws.onmessage = (e) => this._message(e.data);
      ws.onerror = () => { /* the close event follows with the code */ };
      ws.onclose = (e) => {
        if (!opened) {
          refusalReason(this.avatarId, e.code).then((text) => reject(new Error(text)));
        } else {
          this._then(() => this._closed(e));
        }
      };
    });
  }

  send(samples) {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(pcm16(samples));
  }

  end() {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({type: "end"}));
  }

  close() {
    this.finished = true;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
  }

  _then(step) {
    this.chain = this.chain.then(step).catch((err) => this._fail(err));
  }

  _fail(err) {
    if (this.finished) return;
    this.finished = true;
    this.handlers.onError(err);
  }

  _message(data) {
    if (typeof data === "string") {
      let msg;
      try { msg = JSON.parse(data); } catch (_) { return this._fail(new Error("The server sent a message that is not JSON.")); }
      if (msg.type === "frame" || msg.type === "idle") {
        this.header = msg;
      } else if (msg.type === "end") {
        this._then(() => { if (!this.finished) { this.finished = true; this.handlers.onEnd(msg); } });
      } else if (msg.type === "error") {
        this._then(() => this._fail(new Error("The server ended the stream: " + msg.message)));
      }
      return;   // other message types: newer servers may add some; nothing here needs them
    }
    const header = this.header;
    this.header = null;
    if (!header) return this._fail(new Error("The server sent a frame without its header."));
    const decoding = createImageBitmap(data);   // starts now; frames are handed over in order
    this._then(async () => {
      let bitmap;
      try {
        bitmap = await decoding;
      } catch (err) {
        throw new Error(`Frame ${header.index} from the server is not an image the browser can decode.`);
      }
      if (this.finished) { bitmap.close(); return; }
      this.handlers.onFrame({bitmap, index: header.index, pts: header.pts, idle: header.type === "idle"});
    });
  }

  _closed(e) {
    if (this.finished) return;
    const reason = e.reason ? `: ${e.reason}` : "";
    this._fail(new Error(`The connection to the server closed before the end of the stream (code ${e.code}${reason}).`));
  }
}

// A browser does not show a refused WebSocket's HTTP status; ask the API what the matter is.
async function refusalReason(avatarId, code) {
  try {
    await api("v1/avatars/" + encodeURIComponent(avatarId));
    const health = await api("healthz");
    const s = health.sessions;
    if (health.status !== "ok") return "The server is shutting down.";
    if (s && s.streams + s.lipsync_jobs >= s.max) return `All ${s.max} sessions of the server are in use; try again later.`;
  } catch (err) {
    return "The server refused the stream: " + errorText(err);
  }
  return `The server refused the stream (WebSocket close code ${code}).`;
}

// ---- sessions -----------------------------------------------------------------------------------
// What both sessions share: the stream, the drawing loop, stopping and finishing.
class Session {
  constructor(ctx, avatar) {
    this.ctx = ctx;
    this.avatar = avatar;
    this.stopped = false;
    this.endMessage = null;
    this.stream = new LipSyncStream(avatar.avatar_id, {
      onFrame: (frame) => { stats.received++; if (frame.idle) stats.idle++; showStats(); this.onFrame(frame); },
      onEnd: (msg) => { this.endMessage = msg; this.onEnd(); },
      onError: (err) => this.fail(err),
    });
    this.tick = this.tick.bind(this);
  }

  async connect() {
    setStatus("busy", "Connecting…");
    await this.stream.open();
    this.raf = requestAnimationFrame(this.tick);
  }

  tick() {
    if (this.stopped) return;
    this.render();
    this.raf = requestAnimationFrame(this.tick);
  }

  // Stop everything now (Stop button, an error, a new session).
  stop() {
    if (this.stopped) return;
    this.stopped = true;
    cancelAnimationFrame(this.raf);
    this.stream.close();
    this.release();
    if (active === this) active = null;
    buttonsIdle();
  }

  fail(err) {
    this.stop();
    showError(errorText(err), err);
  }

  finish() {
    const m = this.endMessage || {};
    const lat = m.latency_ms ? `; server latency p50 ${m.latency_ms.p50} ms, p95 ${m.latency_ms.p95} ms` : "";
    const dropped = m.dropped ? `, ${m.dropped} dropped by the server (slow connection)` : "";
    this.stop();
    setStatus("done", `Done: ${m.frames} frames, ${stats.drawn} drawn, ${stats.late} late${dropped}${lat}.`);
  }
}

// An audio file, played here and streamed at real-time pace; frames shown by pts.
class FileSession extends Session {
  constructor(ctx, avatar, decoded, pcm) {
    super(ctx, avatar);
    this.decoded = decoded;   // AudioBuffer at the context's rate: what is played
    this.pcm = pcm;           // Float32Array at 16 kHz: what is sent
    this.sent = 0;
    this.t0 = null;           // context time at which audio time 0 is heard (set when frame 0 arrives)
    this.queue = [];          // talk frames waiting for their time, in order
    this.idleFrame = null;    // the newest idle frame before the talk starts
    this.audioEnded = false;
    this.margin = bufferSeconds();   // the sound starts this long after frame 0 arrived
  }

  async start() {
    await this.connect();
    this.sendStart = this.ctx.currentTime;
    this.timer = setInterval(() => this.pump(), 10);
    this.pump();
    setStatus("streaming", "Streaming the file; the sound starts with the first frame…");
  }

  // Send every message whose audio has begun by now on the audio clock (ahead of real time by at
  // most one message, as stream_client.py does), then the end.
  pump() {
    if (this.stopped) return;
    const elapsed = this.ctx.currentTime - this.sendStart;
    const due = Math.min(this.pcm.length, (Math.floor(elapsed * SAMPLE_RATE / CHUNK) + 1) * CHUNK);
    while (this.sent < due) {
      const n = Math.min(CHUNK, due - this.sent);
      this.stream.send(this.pcm.subarray(this.sent, this.sent + n));
      this.sent += n;
    }
    if (this.sent >= this.pcm.length && !this.endSent) {
      this.endSent = true;
      clearInterval(this.timer);
      this.stream.end();
    }
  }

  now() {
    return this.t0 === null ? null : audibleTime(this.ctx) - this.t0;
  }

  onFrame(frame) {
    if (frame.idle) {   // shown only until the talk starts: then every moment has its talk frame
      if (this.t0 === null && this.queue.length === 0) {
        if (this.idleFrame) this.idleFrame.bitmap.close();
        this.idleFrame = frame;
      } else {
        frame.bitmap.close();
      }
      return;
    }
    if (this.t0 === null) this.startSound();
    frame.late = this.now() > frame.pts + 1 / this.avatar.fps;   // its time had passed when it arrived
    if (frame.late) stats.late++;
    this.queue.push(frame);
  }

  startSound() {
    this.t0 = this.ctx.currentTime + this.margin;
    this.source = this.ctx.createBufferSource();
    this.source.buffer = this.decoded;
    this.source.connect(this.ctx.destination);
    this.source.onended = () => { this.audioEnded = true; };
    this.source.start(this.t0);
    setStatus("streaming", "Playing.");
  }

  render() {
    if (this.t0 === null) {
      if (this.idleFrame) { draw(this.idleFrame); this.idleFrame = null; }
      return;
    }
    const a = this.now();
    let due = null;
    while (this.queue.length && (this.queue[0].pts <= a || this.audioEnded)) {
      if (due) due.bitmap.close();   // passed before it could be shown (a late burst)
      due = this.queue.shift();
    }
    if (due) {
      const lag = 1000 * (a - due.pts);   // how long its sound has been playing, ms (never < 0: never early)
      if (!due.late && !this.audioEnded && (stats.worstLag === null || Math.abs(lag) > Math.abs(stats.worstLag))) {
        stats.worstLag = lag;
      }
      draw(due);
    }
    if (this.audioEnded && this.endMessage && !this.queue.length) this.finish();
  }

  onEnd() { /* finish() once the sound has played and every frame was shown (render) */ }

  release() {
    clearInterval(this.timer);
    if (this.source) {
      this.source.onended = null;
      try { this.source.stop(); } catch (_) { /* not started */ }
    }
    for (const f of this.queue) f.bitmap.close();
    this.queue = [];
    if (this.idleFrame) this.idleFrame.bitmap.close();
    this.idleFrame = null;
  }
}

// The microphone, streamed as it is captured; the newest frame is shown.
class MicSession extends Session {
  constructor(ctx, avatar) {
    super(ctx, avatar);
    this.latest = null;       // the newest frame not yet drawn
    this.pending = new Float32Array(0);   // 16 kHz samples not yet sent (under one message)
  }

  async start() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("This browser gives no microphone access here (it needs https:// or http://localhost).");
    }
    try {
      this.media = await navigator.mediaDevices.getUserMedia({
        audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true},
      });
    } catch (err) {
      throw new Error(`No microphone: ${err.name === "NotAllowedError" ? "permission was refused" : errorText(err)}.`);
    }
    await this.connect();
    if (this.stopped) return;
    const ctx = this.ctx;
    this.resampler = new Resampler(ctx.sampleRate, SAMPLE_RATE);
    this.source = ctx.createMediaStreamSource(this.media);
    this.mute = ctx.createGain();   // pulls the capture node through the graph without a sound
    this.mute.gain.value = 0;
    this.mute.connect(ctx.destination);
    if (ctx.audioWorklet && typeof AudioWorkletNode === "function") {
      await ctx.audioWorklet.addModule(serverUrl("web/capture-worklet.js", true));
      this.node = new AudioWorkletNode(ctx, "pcm-capture", {channelCount: 1, channelCountMode: "explicit"});
      this.node.port.onmessage = (e) => this.capture(e.data);
    } else {   // older browsers: the deprecated ScriptProcessor, on the main thread
      this.node = ctx.createScriptProcessor(2048, 1, 1);
      this.node.onaudioprocess = (e) => this.capture(e.inputBuffer.getChannelData(0).slice());
    }
    if (this.stopped) return;
    this.source.connect(this.node);
    this.node.connect(this.mute);
    ui.stop.textContent = "Stop microphone";
    setStatus("streaming", "Listening: speak, and the avatar follows about a quarter of a second behind.");
  }

  capture(block) {
    if (this.stopped || this.ending) return;
    this.queueSamples(this.resampler.push(block), false);
  }

  queueSamples(samples, last) {
    const all = new Float32Array(this.pending.length + samples.length);
    all.set(this.pending);
    all.set(samples, this.pending.length);
    let k = 0;
    for (; k + CHUNK <= all.length; k += CHUNK) this.stream.send(all.subarray(k, k + CHUNK));
    if (last && k < all.length) {
      this.stream.send(all.subarray(k));
      k = all.length;
    }
    this.pending = all.slice(k);
  }

  // Stop button: the microphone stops, what was captured is sent, the server finishes the frames.
  endSpeech() {
    this.ending = true;
    this.releaseAudio();
    this.queueSamples(this.resampler.flush(), true);
    this.stream.end();
    setStatus("busy", "Finishing the last frames…");
  }

  onFrame(frame) {
    if (this.latest) this.latest.bitmap.close();   // live: only the newest frame matters
    this.latest = frame;
  }

  render() {
    if (this.latest) {
      draw(this.latest);
      this.latest = null;
    }
    if (this.endMessage) this.finish();
  }

  onEnd() { /* finish() after the last frame is drawn (render) */ }

  releaseAudio() {
    if (this.node) { this.node.disconnect(); if (this.node.port) this.node.port.onmessage = null; }
    if (this.source) this.source.disconnect();
    if (this.mute) this.mute.disconnect();
    if (this.media) for (const track of this.media.getTracks()) track.stop();
  }

  release() {
    this.releaseAudio();
    if (this.latest) this.latest.bitmap.close();
    this.latest = null;
  }
}

// ---- live sessions over WebRTC (/v1/sessions) --------------------------------------------------
// A live session is an avatar on the server's clock (docs/serving.md, "Live sessions over WebRTC"):
// it idles, silent, until speech comes, then plays the lip-synced frames with that speech, the same
// to every viewer. This tab is one viewer: an RTCPeerConnection that receives the session's video track and
// audio track (one MediaStream: the browser plays them in sync from the server's RTCP sender
// reports) and plays them in the <video>. Speech comes from the server side: a file uploaded to
// .../speak, or this tab's microphone sent as the audio track of the viewer's offer (a sendrecv
// audio transceiver: the server takes what it receives there as speech for the session). Any tab
// can watch the same session: the page's address with #session=ID joins it on load (the id is in
// the fragment, which browsers never send to a server; the token stays in the query, as for the
// rest of the page).
const live = {
  start: el("live-start"), id: el("live-id"), watch: el("live-watch"), leave: el("live-leave"), end: el("live-end"),
  audio: el("live-audio"), say: el("live-say"), mic: el("live-mic"), interrupt: el("live-interrupt"),
  link: el("live-link"), video: el("live-video"), stats: el("live-stats"),
  counts: {session: el("live-session"), viewers: el("live-viewers"), speaking: el("live-speaking"),
           decoded: el("live-decoded"), shown: el("live-shown"), played: el("live-played")},
};
const ICE_GATHER_S = 3;    // the offer waits this long at most for its ICE candidates (the server takes no trickle ICE)
const LIVE_POLL_MS = 1000; // how often the page asks the server for the session's state
let viewer = null;         // this tab's LiveViewer

function jsonBody(value) {
  return {headers: {"Content-Type": "application/json"}, body: JSON.stringify(value)};
}

function sessionPath(id, rest = "") {
  return "v1/sessions/" + encodeURIComponent(id) + rest;
}

// Resolves once the connection's ICE candidates are gathered, or after `seconds` (then the offer
// goes with those found so far: enough for host candidates; a slow STUN server is not waited for).
function iceGathered(pc, seconds) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, seconds * 1000);
    function done() {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    }
    function check() { if (pc.iceGatheringState === "complete") done(); }
    pc.addEventListener("icegatheringstatechange", check);
  });
}

// One viewer of one session: its peer connection, and the microphone it sends, if any.
class LiveViewer {
  constructor(session, media) {
    this.session = session;   // the server's description: session_id, fps, width, height, ice_servers, ...
    this.media = media;       // MediaStream of the microphone sent as speech, or null
    this.pc = null;
    this.viewerId = null;
    this.microphone = false;
    this.closed = false;
    this.connected = false;
    this.shown = 0;           // video frames handed to the screen (requestVideoFrameCallback), where the browser says
  }

  get id() { return this.session.session_id; }

  async connect() {
    if (typeof RTCPeerConnection !== "function") throw new Error("This browser has no WebRTC (RTCPeerConnection).");
    const pc = new RTCPeerConnection({iceServers: this.session.ice_servers || []});
    this.pc = pc;
    const fallback = new MediaStream();   // for tracks that come without a stream
    pc.ontrack = (e) => {
      const stream = e.streams[0] || fallback;
      if (!e.streams[0]) fallback.addTrack(e.track);
      if (!this.closed && live.video.srcObject !== stream) this.show(stream);
    };
    pc.onconnectionstatechange = () => this.stateChanged();
    if (this.media) {
      // addTrack before the offer: the audio m-line becomes sendrecv, carrying the microphone
      for (const track of this.media.getAudioTracks()) pc.addTrack(track, this.media);
    } else {
      pc.addTransceiver("audio", {direction: "recvonly"});
    }
    pc.addTransceiver("video", {direction: "recvonly"});
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, ICE_GATHER_S);
    if (this.closed) return;
    const answer = await api(sessionPath(this.id, "/offer"), {
      method: "POST", ...jsonBody({sdp: pc.localDescription.sdp, type: "offer"})});
    this.viewerId = answer.viewer_id;
    this.microphone = answer.microphone === true;   // the server took the microphone as the session's speech
    if (this.closed) { this.hangUp(); return; }
    await pc.setRemoteDescription({type: answer.type, sdp: answer.sdp});
  }

  show(stream) {
    const video = live.video;
    video.srcObject = stream;
    if (video.requestVideoFrameCallback) {
      const counted = (now, meta) => {
        if (this.closed) return;
        this.shown = meta.presentedFrames;
        video.requestVideoFrameCallback(counted);
      };
      video.requestVideoFrameCallback(counted);
    }
    video.hidden = false;
    video.muted = false;
    video.play().catch((err) => {
      if (err.name !== "NotAllowedError" || this.closed) return;
      // autoplay with sound needs a click (a tab that joined by its address, without one): play
      // muted, and let the user turn the sound on with the video's controls
      video.muted = true;
      video.play().catch(() => {});
      setStatus("live", `Watching ${this.id} muted: the browser wants a click before it plays sound (use the video's sound control).`);
    });
  }

  stateChanged() {
    if (this.closed) return;
    const state = this.pc.connectionState;
    if (state === "connected") {
      this.connected = true;
      let mic = "";
      if (this.media && this.microphone) {
        mic = " Your microphone is sent as speech: the avatar follows it (and you hear silence, not your own voice late).";
      } else if (this.media) {
        mic = " This server does not take the microphone as speech (its answer says so): it ignores it.";
      }
      const muted = live.video.muted ? " Muted by the browser until you click (the video's sound control)." : "";
      setStatus("live", `Watching live session ${this.id} (viewer ${this.viewerId}).${mic}${muted}`);
    } else if (state === "failed" || state === "closed") {
      // the session ended (its viewers are disconnected) or the network failed: say which
      liveEnded(this, this.connected ? "The connection to the live session was lost" : "Could not connect to the live session");
    }
  }

  // Close this tab's connection (and the microphone); the session goes on for its other viewers.
  // `dropped`: the server already let this viewer go (the session ended, or the connection failed).
  close(dropped = false) {
    if (this.closed) return;
    this.closed = true;
    if (this.media) for (const track of this.media.getTracks()) track.stop();
    if (live.video.srcObject) {
      live.video.pause();
      live.video.srcObject = null;
    }
    this.hangUp(dropped);
  }

  hangUp(dropped = false) {
    const pc = this.pc, viewerId = this.viewerId;
    this.viewerId = null;
    if (!viewerId || dropped || pc.connectionState === "failed" || pc.connectionState === "closed") {
      pc && pc.close();
      return;
    }
    // tell the server first, then close: closing first would have the server drop the viewer
    // itself, and the DELETE would find it gone (keepalive: the request outlives an unloading page)
    api(sessionPath(this.id, "/viewers/" + encodeURIComponent(viewerId)), {method: "DELETE", keepalive: true})
      .catch(() => { /* already gone: the session ended, or the server dropped the connection */ })
      .finally(() => pc.close());
  }
}

function liveButtons() {
  const on = viewer !== null;
  live.leave.disabled = live.end.disabled = live.say.disabled = live.interrupt.disabled = live.mic.disabled = !on;
  live.mic.textContent = on && viewer.media ? "Stop microphone" : "Speak (microphone)";
  live.stats.hidden = !on;
}

// The page's address says which session this tab watches (#session=ID), so that reloading it, or
// opening it in another tab, watches the same one.
function addressSession(id) {
  history.replaceState(null, "", location.pathname + location.search + (id ? "#session=" + encodeURIComponent(id) : ""));
  live.link.href = location.href;
}

// Watch `session` (the server's description) in this tab, sending `media` (the microphone) as speech
// if given; replaces what this tab watched before.
async function watchSession(session, media = null) {
  leaveSession();
  const next = new LiveViewer(session, media);
  viewer = next;
  live.id.value = session.session_id;
  addressSession(next.id);
  liveButtons();
  setStatus("busy", `Connecting to live session ${session.session_id}…`);
  try {
    await next.connect();
  } catch (err) {
    if (viewer === next) { viewer = null; liveButtons(); }
    next.close();
    throw err;
  }
  if (viewer !== next) return;
  live.counts.session.textContent = next.id;
  next.poll = setInterval(() => pollSession(next), LIVE_POLL_MS);
  next.tick = setInterval(() => showPlayback(next), 250);
}

function leaveSession(dropped = false) {
  if (!viewer) return;
  const old = viewer;
  viewer = null;
  clearInterval(old.poll);
  clearInterval(old.tick);
  old.close(dropped);
  addressSession(null);
  liveButtons();
}

function liveEnded(which, why) {
  if (viewer !== which) return;
  leaveSession(true);
  showError(`${why}: session ${which.id}.`);
}

async function pollSession(which) {
  let state;
  try {
    state = await api(sessionPath(which.id));
  } catch (err) {
    if (/HTTP 404/.test(errorText(err))) liveEnded(which, "The live session has ended (deleted, or idle too long)");
    return;   // another hiccup: the next poll tries again
  }
  if (viewer !== which) return;
  live.counts.viewers.textContent = state.viewers;
  live.counts.speaking.textContent = state.speaking ? `yes (${state.queued_seconds.toFixed(1)} s queued)` : "no";
}

function showPlayback(which) {
  if (viewer !== which) return;
  const video = live.video;
  const q = video.getVideoPlaybackQuality ? video.getVideoPlaybackQuality() : null;
  if (q) live.counts.decoded.textContent = q.totalVideoFrames;
  live.counts.shown.textContent = which.shown;
  live.counts.played.textContent = `${video.currentTime.toFixed(1)} s`;
}

async function startSession() {
  const avatar = chosenAvatar();
  setStatus("busy", "Starting a live session…");
  const session = await api("v1/sessions", {method: "POST", ...jsonBody({avatar_id: avatar.avatar_id})});
  await watchSession(session);
}

async function watchById(id) {
  id = (id || "").trim();
  if (!id) throw new Error("Type the id of a live session to watch (live-…), or start one.");
  leaveSession();
  setStatus("busy", `Looking up live session ${id}…`);
  let session;
  try {
    session = await api(sessionPath(id));
  } catch (err) {
    addressSession(null);   // the address names no session to watch any more
    throw err;
  }
  await watchSession({...session, session_id: id});
}

function currentViewer() {
  if (!viewer) throw new Error("Start or watch a live session first.");
  return viewer;
}

async function saySpeech() {
  const which = currentViewer();
  const file = live.audio.files[0];
  if (!file) throw new Error("Choose a speech file first.");
  const form = new FormData();
  form.append("audio", file);
  setStatus("busy", `Uploading ${file.name}…`);
  const said = await api(sessionPath(which.id, "/speak"), {method: "POST", body: form});
  const after = said.starts_after > 0 ? `, after ${said.starts_after.toFixed(1)} s already queued` : "";
  setStatus("live", `Saying ${file.name}: ${said.seconds.toFixed(1)} s, ${plural(said.frames, "frame")}${after}.`);
}

async function interruptSpeech() {
  const which = currentViewer();
  const r = await api(sessionPath(which.id, "/speak"), {method: "DELETE"});
  setStatus("live", r.interrupted ? `Interrupted (${plural(r.interrupted, "utterance")} dropped).` : "Nothing was being said.");
}

// The microphone as speech: this tab's viewer connects again with the microphone's track in its
// offer (and again without it to stop).
async function toggleMicrophone() {
  const which = currentViewer();
  if (which.media) {
    await watchSession(which.session);
    return;
  }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("This browser gives no microphone access here (it needs https:// or http://localhost).");
  }
  let media;
  try {
    media = await navigator.mediaDevices.getUserMedia({
      audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true},
    });
  } catch (err) {
    throw new Error(`No microphone: ${err.name === "NotAllowedError" ? "permission was refused" : errorText(err)}.`);
  }
  await watchSession(which.session, media);
}

async function endSession() {
  const which = currentViewer();
  leaveSession(true);   // the session's end disconnects its viewers
  await api(sessionPath(which.id), {method: "DELETE"});
  setStatus("idle", `Live session ${which.id} ended.`);
}

// #session=ID in the page's address: the session to watch on load
function sessionInAddress() {
  const m = /(?:^#|&)session=([^&]*)/.exec(location.hash);
  return m ? decodeURIComponent(m[1]) : null;
}

// ---- buttons ------------------------------------------------------------------------------------
function buttonsIdle() {
  ui.play.disabled = false;
  ui.mic.disabled = false;
  ui.stop.disabled = true;
  ui.stop.textContent = "Stop";
}

function buttonsBusy() {
  ui.play.disabled = true;
  ui.mic.disabled = true;
  ui.stop.disabled = false;
}

async function begin(session, prepare) {
  if (active) active.stop();
  active = session;
  resetStats();
  buttonsBusy();
  try {
    await prepare();
  } catch (err) {
    session.stop();
    throw err;
  }
}

async function playFile() {
  const file = ui.audioFile.files[0];
  if (!file) throw new Error("Choose an audio file first.");
  const avatar = chosenAvatar();
  const ctx = await audioContext();   // while the click still counts as a user gesture
  setStatus("busy", "Decoding the audio…");
  let decoded;
  try {
    decoded = await ctx.decodeAudioData(await file.arrayBuffer());
  } catch (err) {
    throw new Error(`${file.name}: the browser cannot decode this file as audio (${errorText(err)}).`);
  }
  const pcm = await resampleTo16k(decoded);
  const session = new FileSession(ctx, avatar, decoded, pcm);
  await begin(session, () => session.start());
}

async function startMic() {
  const avatar = chosenAvatar();
  const ctx = await audioContext();
  const session = new MicSession(ctx, avatar);
  await begin(session, () => session.start());
}

function stopButton() {
  if (!active) return;
  if (active instanceof MicSession && active.resampler && !active.ending && !active.stopped) {
    active.endSpeech();
    ui.stop.disabled = true;
  } else {
    active.stop();
    setStatus("idle", "Stopped.");
  }
}

ui.refresh.addEventListener("click", guarded(() => refreshAvatars()));
ui.uploadForm.addEventListener("submit", guarded(uploadAvatar));
ui.play.addEventListener("click", guarded(playFile));
ui.mic.addEventListener("click", guarded(startMic));
ui.stop.addEventListener("click", guarded(stopButton));
live.start.addEventListener("click", guarded(startSession));
live.watch.addEventListener("click", guarded(() => watchById(live.id.value)));
live.leave.addEventListener("click", guarded(() => { leaveSession(); setStatus("idle", "Left the live session."); }));
live.end.addEventListener("click", guarded(endSession));
live.say.addEventListener("click", guarded(saySpeech));
live.interrupt.addEventListener("click", guarded(interruptSpeech));
live.mic.addEventListener("click", guarded(toggleMicrophone));
window.addEventListener("pagehide", () => { if (viewer) viewer.close(); });
buttonsIdle();
liveButtons();
const joining = sessionInAddress();
guarded(async () => {
  await refreshAvatars();
  if (joining) await watchById(joining);
  else setStatus("idle", "Pick an avatar, then play a file or start the microphone, or start a live session.");
})();
