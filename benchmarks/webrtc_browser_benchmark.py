"""A live session as a browser plays it: speak-to-lip-sync latency and the A/V offset, in headless Chromium.

    python benchmarks/webrtc_browser_benchmark.py                  # tiny generator, 10 repeats
    python benchmarks/webrtc_browser_benchmark.py --repeats 10 --json webrtc_browser.json

One ``serve.py`` (a real subprocess, as users run it; the tiny generator: generated weights, fp32,
CPU) gets one avatar (a 256x256 photograph, face box given); headless Chromium opens the web page,
starts a live session there and plays it over WebRTC in the page's <video>. After --settle_seconds
(Chrome's A/V synchronisation adjusts the video's delay gradually after connecting: its own
estimate is printed meanwhile), each repeat the page itself POSTs a known sound to
``/v1/sessions/ID/speak`` with fetch, so every time below is on the browser's one clock
(``performance.now()``), and records:

- the first lip-synced frame: every frame the <video> presents (``requestVideoFrameCallback``) is
  drawn into a canvas and its mouth box (the lower half of the face box) compared with the
  photograph; the first frame after the request whose mean absolute difference is over
  --talk_level grey levels, at its ``expectedDisplayTime`` (when the browser puts it on screen);
- the sound's onset as the <video> plays it: the audio receiver's ``getSynchronizationSources()``,
  polled every 2 ms, gives each packet's RTP timestamp, the time it was delivered to the audio
  device and its level (the RTP audio-level header the server sends); the first packet over
  --onset_level is the onset, placed to a millisecond or two by the steady 48 samples per ms of
  playout (``played_onset``), plus the device's playout delay (``media-playout`` statistics);
- the same onset through a WebAudio AnalyserNode on the received track (the first sample over
  --onset_level in the analyser's last 8192, placed on the AudioContext clock and moved to the
  output clock with ``getOutputTimestamp()``): a copy of the sound that passes through WebAudio's
  own buffer and output, so it arrives later than the <video> plays it; shown for comparison.

The sound (a --burst_seconds buzz at 150 Hz with harmonics, full level from its first millisecond)
starts with the utterance, so its onset is talk frame 0's sound, and talk frame 0 is the first frame
that differs from the idle frames. The tiny generator is untrained: its talk frames differ from the
photograph in the mouth box whatever the sound (that is what the server renders for speech), not a
mouth that follows the voice; the timing is the same as with trained weights.

- latency: first lip-synced frame on screen - the speak request (its upload, the mel windows, the
  ``serve.py --webrtc_lead`` of rendering before an utterance plays, the next tick, the network,
  the browser's jitter buffers, decoding and display);
- A/V offset: that frame on screen - its sound's onset as played; 0 is perfect, > 0 the picture is
  late, < 0 early. The goal is within one frame period (1 / fps).

Median and max over the repeats are printed with the CPU and the load average.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import audio  # noqa: E402
from lipsync.core.cli import HelpFormatter  # noqa: E402

BOX = "40 200 60 196"       # top bottom left right of the face in the 256x256 photograph
MOUTH = (60, 120, 136, 80)   # x, y, width, height in pixels: the lower half of the face box

# Installed once the <video> plays; window.__bench.run(speakUrl, file, talkLevel, onsetLevel, timeoutMs)
# measures one utterance.
INSTRUMENT = """
const photoUrl = arguments[0], box = arguments[1], done = arguments[arguments.length - 1];
const video = document.getElementById('live-video');
const [x, y, w, h] = box;
const canvas = document.createElement('canvas');
canvas.width = video.videoWidth; canvas.height = video.videoHeight;
const g = canvas.getContext('2d', {willReadFrequently: true});
const ctx = new AudioContext();
const analyser = ctx.createAnalyser();
analyser.fftSize = 8192;
const mute = ctx.createGain();
mute.gain.value = 0;
ctx.createMediaStreamSource(video.srcObject).connect(analyser);
analyser.connect(mute).connect(ctx.destination);   // pulled through the graph without a sound
const samples = new Float32Array(analyser.fftSize);
const bench = window.__bench = {ref: null, armed: null, frames: 0};
function mouthDiff() {
  g.drawImage(video, 0, 0, canvas.width, canvas.height);
  const px = g.getImageData(x, y, w, h).data;
  let sum = 0;
  for (let i = 0; i < px.length; i += 4) for (let k = 0; k < 3; k++) sum += Math.abs(px[i + k] - bench.ref[i + k]);
  return sum / (px.length / 4 * 3);
}
function onFrame(now, meta) {
  bench.frames++;
  const a = bench.armed;
  if (a) {
    const diff = mouthDiff();
    a.lastDiff = diff;
    if (a.mouth === null && diff > a.talkLevel && meta.expectedDisplayTime > a.asked) {
      a.mouth = meta.expectedDisplayTime; a.mouthDiff = diff; a.gap = (meta.rtpTimestamp - a.lastRtp) >>> 0;
    }
    if (a.mouth === null) { a.idleDiff = diff; a.lastRtp = meta.rtpTimestamp; }
    if (a.mouth !== null) a.idleRun = diff > a.talkLevel ? 0 : a.idleRun + 1;
  }
  video.requestVideoFrameCallback(onFrame);
}
function onAudio() {
  const a = bench.armed;
  if (!a || a.onset !== null) return;
  analyser.getFloatTimeDomainData(samples);
  const end = ctx.currentTime, ts = ctx.getOutputTimestamp();
  let i = samples.findIndex((v) => Math.abs(v) > a.onsetLevel);
  if (i < 0) return;
  const at = end - (samples.length - i) / ctx.sampleRate;            // context time of the onset sample
  const heard = ts.performanceTime + (at - ts.contextTime) * 1000;  // when it is output, performance.now() ms
  if (heard > a.asked) { a.onset = heard; a.onsetPeak = Math.max(...samples.subarray(i).map(Math.abs)); }
}
setInterval(onAudio, 10);
const receiver = viewer.pc.getReceivers().find((r) => r.track.kind === 'audio');
function onSources() {   // (RTP timestamp, delivered at, audio level) of the audio packets the <video> plays
  const a = bench.armed;
  if (!a) return;
  const clock = Date.now() - performance.now();   // the sources' times are on the wall clock
  for (const src of receiver.getSynchronizationSources()) {
    const last = a.packets[a.packets.length - 1];
    if (!last || last[0] !== src.rtpTimestamp || last[1] !== src.timestamp - clock) {
      a.packets.push([src.rtpTimestamp, src.timestamp - clock, src.audioLevel]);
    }
  }
}
setInterval(onSources, 2);
async function playout() {   // Chrome's own view: estimated playout times and the audio device's delay
  const out = {};
  (await viewer.pc.getStats()).forEach((r) => {
    if (r.type === 'inbound-rtp') out[r.kind] = r.estimatedPlayoutTimestamp;
    if (r.type === 'media-playout' && r.totalSamplesCount) out.device = 1000 * r.totalPlayoutDelay / r.totalSamplesCount;
  });
  return out;
}
bench.playout = playout;
bench.run = async function (speakUrl, file, talkLevel, onsetLevel, timeoutMs) {
  const a = bench.armed = {talkLevel, onsetLevel, asked: performance.now(), answered: null, mouth: null, onset: null,
                           idleRun: 0, lastDiff: null, packets: [], idleDiff: null, lastRtp: 0};
  const form = new FormData();
  form.append('audio', file);
  const said = await api(speakUrl, {method: 'POST', body: form});
  a.answered = performance.now();
  const end = a.asked + timeoutMs;
  while ((a.mouth === null || a.onset === null || a.idleRun < 25) && performance.now() < end) {
    await new Promise((r) => setTimeout(r, 20));
  }
  bench.armed = null;
  return {...a, frames: said.frames, playout: await playout(), outputLatency: ctx.outputLatency || 0, baseLatency: ctx.baseLatency || 0,
          state: ctx.state};
};
const img = new Image();
img.onload = () => {
  g.drawImage(img, 0, 0, canvas.width, canvas.height);
  bench.ref = g.getImageData(x, y, w, h).data;
  video.requestVideoFrameCallback(onFrame);
  ctx.resume().then(() => done(ctx.state));
};
img.onerror = () => done('the photograph did not load');
img.src = photoUrl;
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--repeats", type=int, default=10, help="utterances measured, one after another")
    p.add_argument("--burst_seconds", type=float, default=0.8, help="length of the known sound, seconds")
    p.add_argument("--talk_level", type=float, default=12.0,
                   help="mean absolute difference from the photograph's mouth box (grey levels) over which a frame talks")
    p.add_argument("--onset_level", type=float, default=0.05, help="sample level (of full scale 1) over which the sound has begun")
    p.add_argument("--settle_seconds", type=float, default=5.0,
                   help="seconds between connecting and the first repeat (Chrome's A/V sync adjusts over the first 20 s or so)")
    p.add_argument("--workdir", default=None, help="folder for the checkpoint, avatar, logs (default: a new temporary one)")
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    return p


def buzz(path: str, seconds: float) -> str:
    """Write a speech-like sound with a sharp onset to ``path`` (16 kHz mono wav): a 150 Hz buzz
    (harmonics up to 3 kHz falling as 1/k), at 0.5 of full scale from a 1 ms rise at sample 0 to a
    20 ms fall at ``seconds``. Returns ``path``."""
    sr = audio.SAMPLE_RATE
    t = np.arange(int(seconds * sr)) / sr
    wave = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 21))
    wave *= 0.5 / np.abs(wave).max()
    env = np.minimum(1.0, np.minimum(t / 0.001, (seconds - t) / 0.02))
    audio.save_wav((wave * np.clip(env, 0, 1)).astype(np.float32), path, sr)
    return path


def played_onset(packets, level: float, after: float):
    """When the first audio packet over ``level`` after ``after`` (ms) was delivered to the audio
    device, in ``performance.now()`` ms; None when the polls missed the packet before it.

    ``packets``: [(RTP timestamp (48 kHz), delivered at (ms), audio level (0-1))] as polled from
    ``getSynchronizationSources()``: each poll shows the latest delivery, and a 20 ms packet is
    delivered in two 10 ms halves, so an observation of packet ``r`` at ``t`` says the onset packet
    ``R`` was delivered at ``t - (r - R) / 48`` or 10 ms before; the median of the lower cluster of
    those over the 300 ms around the onset is the answer."""
    loud = [p for p in packets if p[2] > level and p[1] > after]
    if not loud:
        return None
    onset = loud[0][0]

    def ahead(r):   # samples from the onset packet to r, RTP timestamps wrapping at 2**32
        return (r - onset + 2 ** 31) % 2 ** 32 - 2 ** 31

    if not any(ahead(r) == -960 and lv <= level for r, _, lv in packets):
        return None
    starts = [t - ahead(r) / 48 for r, t, _ in packets if abs(ahead(r)) <= 48 * 300]
    low = min(starts)
    return statistics.median([v for v in starts if v <= low + 5])


def chrome_offset(driver) -> str:
    """Chrome's estimate of its A/V offset now: video - audio estimatedPlayoutTimestamp, ms, as text."""
    p = driver.execute_async_script("window.__bench.playout().then(arguments[arguments.length - 1]);")
    return "-" if p.get("video") is None or p.get("audio") is None else f"{p['video'] - p['audio']:+.0f}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.burst_seconds < 0.2:
        raise SystemExit("error: --repeats must be at least 1 and --burst_seconds at least 0.2")
    from browser import chromium, missing, wait_state
    from media import astronaut
    from serving import Server, get_json, tiny_checkpoint

    reason = missing()
    if reason:
        raise SystemExit(f"error: {reason}")
    import cv2
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from lipsync.render.cpu import cpu_capabilities

    print(f"CPU: {cpu_capabilities().line()}")
    print(f"load average (1, 5, 15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="webrtc_browser_bench_")
    os.makedirs(workdir, exist_ok=True)
    photo = os.path.join(workdir, "face.png")
    cv2.imwrite(photo, astronaut())
    with open(photo, "rb") as fh:
        photo_url = "data:image/png;base64," + base64.b64encode(fh.read()).decode("ascii")
    sound = buzz(os.path.join(workdir, "burst.wav"), args.burst_seconds)
    ckpt = tiny_checkpoint(os.path.join(workdir, "wav2lip_tiny.pth"))
    server = Server(ckpt, os.path.join(workdir, "avatars"), os.path.join(workdir, "server.log"))
    driver = None
    rows = []
    try:
        r = server.upload(photo, box=BOX)
        assert r.status_code == 201, r.text
        avatar = r.json()
        fps = float(avatar["fps"])
        driver = chromium(workdir, sound, script_timeout=120)
        driver.get(server.url + "/")
        wait_state(driver, ("idle",), 60)
        driver.find_element(By.CSS_SELECTOR, f"#avatar option[value='{avatar['avatar_id']}']").click()
        driver.find_element(By.ID, "live-start").click()
        wait_state(driver, ("live",), 60)
        WebDriverWait(driver, 60, poll_frequency=0.1).until(
            lambda d: d.execute_script("return document.getElementById('live-video').videoWidth > 0"))
        sid = driver.find_element(By.ID, "live-id").get_attribute("value")
        started = driver.execute_async_script(INSTRUMENT, photo_url, list(MOUTH))
        if started != "running":
            raise SystemExit(f"error: the benchmark's AudioContext is {started!r}, not running")
        driver.find_element(By.ID, "live-audio").send_keys(sound)
        connected = time.monotonic()
        print(f"session {sid}: avatar {avatar['width']}x{avatar['height']} at {fps:g} fps (frame period "
              f"{1000 / fps:.0f} ms); sound: a {args.burst_seconds:g} s buzz from its first sample", flush=True)
        settle = []
        while time.monotonic() - connected < args.settle_seconds:
            time.sleep(min(5.0, max(0.0, args.settle_seconds - (time.monotonic() - connected))))
            settle.append(f"{time.monotonic() - connected:.0f} s: {chrome_offset(driver)}")
        if settle:
            print("Chrome's estimate of its own A/V offset (video - audio playout, inbound-rtp estimatedPlayoutTimestamp) "
                  "while its sync settles: " + ", ".join(settle) + " ms")
        print("\nrepeat | since connected s | speak answered ms | latency to the first lip-synced frame ms | "
              "A/V offset ms: frame - sound as played | - sound via the AnalyserNode | Chrome's estimate")
        for k in range(args.repeats):
            since = time.monotonic() - connected
            m = driver.execute_async_script(
                "const [u, lv, on, t] = arguments; window.__bench.run(u, document.getElementById('live-audio').files[0], "
                "lv, on, t).then(arguments[arguments.length - 1]);",
                f"v1/sessions/{sid}/speak", args.talk_level, args.onset_level, 60000)
            played = played_onset(m["packets"], args.onset_level, m["asked"])
            if m["mouth"] is None or played is None:
                print(f"{k + 1} | no {'lip-synced frame' if m['mouth'] is None else 'sound onset'} seen within 60 s "
                      f"(last mouth difference {m['lastDiff']})", flush=True)
            else:
                heard = played + m["playout"].get("device", 0.0)
                row = {"since_connected_s": since, "answered_ms": m["answered"] - m["asked"],
                       "latency_ms": m["mouth"] - m["asked"], "offset_ms": m["mouth"] - heard,
                       "offset_analyser_ms": None if m["onset"] is None else m["mouth"] - m["onset"],
                       "chrome_estimate_ms": m["playout"]["video"] - m["playout"]["audio"],
                       "device_delay_ms": m["playout"].get("device"), "mouth_diff": m["mouthDiff"],
                       "frame_before_diff": m["idleDiff"], "video_rtp_step": m["gap"]}
                rows.append(row)
                analyser = "-" if row["offset_analyser_ms"] is None else f"{row['offset_analyser_ms']:+.0f}"
                print(f"{k + 1} | {since:.0f} | {row['answered_ms']:.0f} | {row['latency_ms']:.0f} | "
                      f"{row['offset_ms']:+.0f} | {analyser} | {row['chrome_estimate_ms']:+.0f}", flush=True)
            WebDriverWait(driver, 60, poll_frequency=0.2).until(
                lambda d: not get_json(f"{server.url}/v1/sessions/{sid}")["speaking"])
            time.sleep(0.5)
        state = get_json(f"{server.url}/v1/sessions/{sid}")
    finally:
        if driver is not None:
            driver.quit()
        server.stop()
    if not rows:
        print("no repeat measured")
        return 1
    lat = [r["latency_ms"] for r in rows]
    off = [r["offset_ms"] for r in rows]
    worst = max(abs(v) for v in off)
    period = 1000 / fps
    print(f"\nlatency, speak request -> first lip-synced frame on screen: median {statistics.median(lat):.0f} ms, "
          f"max {max(lat):.0f} ms ({len(rows)} of {args.repeats} repeats)")
    print(f"A/V offset as played (frame on screen - its sound's playout): median {statistics.median(off):+.0f} ms, "
          f"max |offset| {worst:.0f} ms: {'within' if worst <= period else 'NOT within'} one frame period "
          f"({period:.0f} ms) in every repeat")
    via = [r["offset_analyser_ms"] for r in rows if r["offset_analyser_ms"] is not None]
    if via:
        print(f"(the same sound reaches an AnalyserNode {statistics.median(off) - statistics.median(via):.0f} ms later "
              f"(median): WebAudio's own buffering and output latency, which the <video>'s playout does not have)")
    steps = sorted({r["video_rtp_step"] for r in rows})
    print(f"the first lip-synced frame: mouth box {min(r['mouth_diff'] for r in rows):.0f}-"
          f"{max(r['mouth_diff'] for r in rows):.0f} grey levels from the photograph, the frame before it "
          f"{max(r['frame_before_diff'] for r in rows):.1f} at most; RTP steps from the frame before: {steps} "
          f"(one frame: {round(90000 / fps)})")
    print(f"server: {state['stalls']} stalled ticks, {state['spoken']} utterances spoken; audio device delay "
          f"{rows[-1]['device_delay_ms']:.0f} ms")
    print(f"load average at the end (1, 5, 15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": cpu_capabilities().line(), "fps": fps, "rows": rows, "repeats": args.repeats}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
