"""The web page's live mode (WebRTC) in a real browser: Debian's headless Chromium driven by selenium,
against serve.py with a tiny generator. Started from the page, a live session plays in the page's
<video>: both tracks arrive and play (the video's clock advances, frames are decoded and presented,
the audio is received and played out), speech uploaded through the page changes the mouth region of
the frames the browser presents (compared with the avatar's photo, drawn into a canvas) and is heard
(the received audio's energy), an interruption brings the idle frames back within a few frames, a
second tab joins the same session by its address (#session=ID) and plays it too, the microphone is
sent as an audio track of the viewer's offer, and a server with a token works through the page.

The tiny generator is untrained: a "talk" frame is one whose mouth box differs from the idle frames
(the photo), which is what the server renders for speech, not a mouth that follows the sound.
Skipped when chromium, chromedriver, selenium or aiortc is missing."""
import base64

import pytest

import audio
from browser import PHOTO_BOX as BOX, chromium, errors_logged, missing, page_server, photo_avatar, state, wait_state
from media import photo_and_speech
from serving import Server, tiny_checkpoint

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("aiortc", reason="aiortc is not installed (pip install -r requirements-webrtc.txt)")
if missing():
    pytest.skip(missing(), allow_module_level=True)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

MOUTH = (60, 120, 136, 80)  # x, y, width, height: the lower half of the face box, where the mouth is
FPS = 25.0
TALK_DIFF = 12.0           # mean absolute difference (grey levels) from the photo above which a frame talks
TOKEN = "browser-webrtc-token"

# Installed in a tab once its <video> plays: for every frame the video presents
# (requestVideoFrameCallback), the mean absolute difference of its mouth box from the avatar's photo
# (both drawn into a canvas), with the frame's expected display time on the browser's absolute clock
# (performance.timeOrigin + performance.now(), ms: comparable between tabs).
MONITOR = """
const photoUrl = arguments[0], box = arguments[1], done = arguments[arguments.length - 1];
const [x, y, w, h] = box, video = document.getElementById('live-video');
const canvas = document.createElement('canvas');
canvas.width = video.videoWidth; canvas.height = video.videoHeight;
const g = canvas.getContext('2d', {willReadFrequently: true});
const img = new Image();
img.onload = () => {
  g.drawImage(img, 0, 0, canvas.width, canvas.height);
  const ref = g.getImageData(x, y, w, h).data;
  const mon = window.__monitor = {frames: []};
  function frame(now, meta) {
    g.drawImage(video, 0, 0, canvas.width, canvas.height);
    const px = g.getImageData(x, y, w, h).data;
    let sum = 0;
    for (let i = 0; i < px.length; i += 4) for (let k = 0; k < 3; k++) sum += Math.abs(px[i + k] - ref[i + k]);
    mon.frames.push([performance.timeOrigin + meta.expectedDisplayTime, sum / (px.length / 4 * 3)]);
    video.requestVideoFrameCallback(frame);
  }
  video.requestVideoFrameCallback(frame);
  done(true);
};
img.onerror = () => done(false);
img.src = photoUrl;
"""

# The viewer's media as the browser sees it: tracks of the <video>'s stream, its clock, decoded and
# presented frames, and the inbound (and outbound) RTP statistics of its peer connection.
MEDIA = """
const done = arguments[arguments.length - 1], video = document.getElementById('live-video');
const stream = video.srcObject;
const out = {video: stream ? stream.getVideoTracks().map(t => t.readyState) : [],
             audio: stream ? stream.getAudioTracks().map(t => t.readyState) : [],
             currentTime: video.currentTime, paused: video.paused, muted: video.muted,
             decoded: video.getVideoPlaybackQuality().totalVideoFrames,
             shown: Number(document.getElementById('live-shown').textContent),
             now: performance.timeOrigin + performance.now(), rtp: {}, sent: null,
             transceivers: viewer ? viewer.pc.getTransceivers().map(t => [t.receiver.track.kind, t.currentDirection,
                                                                           t.sender.track ? t.sender.track.readyState : null]) : []};
if (!viewer) { done(out); return; }
viewer.pc.getStats().then(stats => {
  stats.forEach(r => {
    if (r.type === 'inbound-rtp') out.rtp[r.kind] = r;
    if (r.type === 'outbound-rtp' && r.kind === 'audio') out.sent = r;
  });
  done(out);
});
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser_webrtc")
    files = photo_and_speech(d, "face.png", {"speech": ("speech_1s.wav", 0.5, 1.5), "long": ("speech_6s.wav", 0, 6)})
    with open(files["photo"], "rb") as fh:
        photo_url = "data:image/png;base64," + base64.b64encode(fh.read()).decode("ascii")
    return {"dir": d, "ckpt": tiny_checkpoint(d / "wav2lip_tiny.pth"), "photo_url": photo_url, **files}


@pytest.fixture(scope="module")
def server(assets):
    with page_server(assets) as s:
        yield s


@pytest.fixture(scope="module")
def avatar_id(server, assets):
    return photo_avatar(server, assets["photo"])


@pytest.fixture(scope="module")
def browser(assets):
    driver = chromium(assets["dir"], assets["speech"], script_timeout=60)
    try:
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------------
def wait_until(browser, predicate, timeout, message):
    """Poll ``predicate(browser)`` every 0.1 s for up to ``timeout`` seconds; fail with ``message``."""
    WebDriverWait(browser, timeout, poll_frequency=0.1).until(predicate, message)


def media(browser):
    return browser.execute_async_script(MEDIA)


def start_live(browser, server, avatar, address="/"):
    """Open the page, pick ``avatar`` and start a live session; returns its id once the tab plays it."""
    browser.get_log("browser")
    browser.get(server.url + address)
    wait_state(browser, ("idle",), 60)
    browser.find_element(By.CSS_SELECTOR, f"#avatar option[value='{avatar}']").click()
    browser.find_element(By.ID, "live-start").click()
    return playing(browser)


def playing(browser):
    """Wait until this tab is connected to its live session and its video presents frames; the session id."""
    wait_state(browser, ("live",), 60)
    wait_until(browser, lambda d: media(d)["shown"] >= 10, 60, "the live video presents no frames")
    return browser.find_element(By.ID, "live-id").get_attribute("value")


def monitor(browser, assets):
    assert browser.execute_async_script(MONITOR, assets["photo_url"], list(MOUTH)), "the photo did not load"


def frames(browser):
    """[(expected display time, ms on the absolute clock; mouth box difference from the photo)] so far."""
    return browser.execute_script("return window.__monitor.frames;")


def talking(frame_list):
    return [diff > TALK_DIFF for _, diff in frame_list]


def session_state(server, sid, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{server.url}/v1/sessions/{sid}", headers=headers, timeout=10)


def choose_and_say(browser, wav):
    browser.find_element(By.ID, "live-audio").send_keys(wav)
    browser.find_element(By.ID, "live-say").click()
    wait_until(browser, lambda d: d.find_element(By.ID, "status").text.startswith("Saying"), 60,
               "the page did not say the file")


def click_at(browser, button):
    """Click the page's ``button`` (an id) from the page's own script; the click's time on the absolute clock, ms."""
    return browser.execute_script(f"const t = performance.timeOrigin + performance.now(); "
                                  f"document.getElementById('{button}').click(); return t;")


# ------------------------------------------------------------------------------------------------
def test_a_live_session_plays_both_tracks_and_speaks(browser, server, assets, avatar_id):
    """Started from the page, the session's video and audio tracks play in the <video> (its clock
    advances, frames are decoded and presented at about the avatar's rate, audio is received and
    played out); idle frames show the photo, silent; a file said through the page changes the mouth
    region of the presented frames for about its length and is heard; then the idle frames return."""
    sid = start_live(browser, server, avatar_id)
    assert sid.startswith("live-")
    assert browser.current_url.endswith(f"/#session={sid}")
    assert browser.find_element(By.ID, "live-link").get_attribute("href") == browser.current_url
    before = media(browser)
    assert before["video"] == ["live"] and before["audio"] == ["live"], before
    assert not before["paused"] and not before["muted"]
    monitor(browser, assets)
    wait_until(browser, lambda d: len(frames(d)) >= 50, 60, "fewer than 50 frames presented")
    after = media(browser)
    seconds = (after["now"] - before["now"]) / 1000
    assert after["currentTime"] - before["currentTime"] > 0.5 * seconds, (before["currentTime"], after["currentTime"])
    assert after["decoded"] - before["decoded"] >= 0.5 * FPS * seconds, (before["decoded"], after["decoded"], seconds)
    assert after["rtp"]["video"]["framesDecoded"] >= after["decoded"] - 5
    played = after["rtp"]["audio"]["totalSamplesDuration"] - before["rtp"]["audio"]["totalSamplesDuration"]
    assert played > 0.5 * seconds, played            # the audio track is played out
    idle = frames(browser)
    assert not any(talking(idle[-25:])), idle[-25:]  # the photo, while nobody speaks
    silent = after["rtp"]["audio"]["totalAudioEnergy"]
    assert silent < 1e-4, silent

    n = audio.num_frames_for_audio(len(audio.load_wav(assets["speech"])), FPS)
    stalls = session_state(server, sid).json()["stalls"]
    seen = len(frames(browser))
    choose_and_say(browser, assets["speech"])
    wait_until(browser, lambda d: session_state(server, sid).json()["spoken"] == 1, 60, "the speech never ended")

    def idle_again(d):
        shown = talking(frames(d)[seen:])
        return any(shown) and len(shown) >= 25 and not any(shown[-25:])

    wait_until(browser, idle_again, 60, "the idle frames did not come back after the speech")
    shown = talking(frames(browser)[seen:])
    held = session_state(server, sid).json()["stalls"] - stalls   # a renderer behind holds its last frame a tick
    print(f"talk frames presented: {sum(shown)} of {n}; mouth box difference from the photo: idle up to "
          f"{max(d for _, d in idle):.1f}, talking {min(d for (_, d), t in zip(frames(browser)[seen:], shown) if t):.1f} "
          f"and more (threshold {TALK_DIFF})")
    assert n * 0.6 <= sum(shown) <= n + held + 2, (sum(shown), n, held)   # a busy browser may skip a few
    first, last = shown.index(True), len(shown) - 1 - shown[::-1].index(True)
    assert last - first < n + held + 10, (first, last, n, held)   # one run of talk frames, the speech's length
    assert not any(shown[last + 1:])                           # then the idle frames again
    heard = media(browser)["rtp"]["audio"]["totalAudioEnergy"] - silent
    assert heard > 1e-3, heard
    assert errors_logged(browser) == []


def test_interrupt_and_a_second_tab(browser, server, assets, avatar_id):
    """A second window opened at the first one's address (#session=ID) watches the same session;
    long speech talks in both; Interrupt in the first brings the idle frames back within a few
    frames in both; the second window's viewer leaves the session when it closes; a session ended
    elsewhere is reported. (A window, not a background tab: Chrome presents no video frames in a
    hidden tab, so there would be nothing to compare.)"""
    sid = start_live(browser, server, avatar_id)
    first = browser.current_window_handle
    address = browser.current_url
    monitor(browser, assets)
    browser.switch_to.new_window("window")
    second = browser.current_window_handle
    try:
        browser.get(address)
        assert playing(browser) == sid
        m = media(browser)
        assert m["video"] == ["live"] and m["audio"] == ["live"] and not m["paused"], m
        monitor(browser, assets)
        assert session_state(server, sid).json()["viewers"] == 2

        browser.switch_to.window(first)
        choose_and_say(browser, assets["long"])
        for tab in (first, second):
            browser.switch_to.window(tab)
            wait_until(browser, lambda d: sum(talking(frames(d))) >= 25, 60, "no talk frames in a tab")
        browser.switch_to.window(first)
        asked = click_at(browser, "live-interrupt")
        wait_until(browser, lambda d: d.find_element(By.ID, "status").text.startswith("Interrupted (1 utterance"), 30,
                   "the page did not interrupt")
        for tab in (first, second):
            browser.switch_to.window(tab)
            wait_until(browser, lambda d: frames(d)[-1][0] > asked + 2000, 30, "no frames after the interruption")
            after = [(t, talk) for (t, talk) in zip([t for t, _ in frames(browser)], talking(frames(browser)))
                     if t > asked]
            still = [t - asked for t, talk in after if talk]
            # the server goes idle at its next tick; what remains is the way to the screen (network,
            # jitter buffer, decoding): a few frames, on a loaded machine a few more
            assert len(still) <= 12 and (not still or max(still) < 1000), still
            assert sum(1 for _, talk in after) > 25 and not any(talk for t, talk in after if t > asked + 1000)
            print(f"interrupt: {len(still)} talk frames presented after the click "
                  f"(the last {max(still) if still else 0:.0f} ms after it)")
        assert session_state(server, sid).json()["interrupted"] == 1
        browser.switch_to.window(second)
        assert errors_logged(browser) == []
    finally:
        if browser.current_window_handle != second:
            browser.switch_to.window(second)
        browser.close()
        browser.switch_to.window(first)
    wait_until(browser, lambda d: session_state(server, sid).json()["viewers"] == 1, 30,
               "the closed window's viewer stayed")
    assert errors_logged(browser) == []
    # the session ended elsewhere (here: by the API): the page says so and lets the viewer go
    assert httpx.delete(f"{server.url}/v1/sessions/{sid}", timeout=10).status_code == 204
    wait_until(browser, lambda d: state(d) == "error", 30, "the page did not notice the end of its session")
    assert sid in browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "live-leave").get_attribute("disabled") is not None
    assert browser.execute_script("return document.getElementById('live-video').srcObject === null")


def test_microphone_is_sent_as_the_offers_audio_track(browser, server, assets, avatar_id):
    """Speak (microphone): the viewer connects again with the microphone (the fake capture device,
    playing speech in a loop) added before the offer, so its audio transceiver is sendrecv and the
    microphone's packets go out, while the session still plays. A server that takes it as speech
    (its answer says ``"microphone": true``) makes the mouth move with it; one that does not is
    named so on the page. Stop microphone connects again receive-only and releases it."""
    sid = start_live(browser, server, avatar_id)
    assert media(browser)["transceivers"] == [["audio", "recvonly", None], ["video", "recvonly", None]]
    browser.find_element(By.ID, "live-mic").click()
    wait_until(browser, lambda d: "microphone as speech" in d.find_element(By.ID, "status").text
               or "microphone is sent as speech" in d.find_element(By.ID, "status").text, 60,
               "the page did not connect with the microphone")
    assert playing(browser) == sid
    m = media(browser)
    assert m["transceivers"] == [["audio", "sendrecv", "live"], ["video", "recvonly", None]], m["transceivers"]
    wait_until(browser, lambda d: (media(d)["sent"] or {}).get("packetsSent", 0) >= 50, 30,
               "the microphone's packets do not go out")
    assert browser.find_element(By.ID, "live-mic").text == "Stop microphone"
    assert session_state(server, sid).json()["viewers"] == 1   # the receive-only viewer was replaced
    status = browser.find_element(By.ID, "status").text
    if browser.execute_script("return viewer.microphone"):
        assert "microphone is sent as speech" in status, status
        monitor(browser, assets)
        wait_until(browser, lambda d: sum(talking(frames(d))) >= 25, 60, "the mouth does not follow the microphone")
    else:   # a server without microphone speech (the answer has no "microphone": true)
        assert "does not take the microphone as speech" in status, status
    track_state = "return viewer.media ? viewer.media.getAudioTracks()[0].readyState : null"
    assert browser.execute_script(track_state) == "live"
    browser.find_element(By.ID, "live-mic").click()
    wait_until(browser, lambda d: d.execute_script("return viewer && viewer.connected && !viewer.media"), 60,
               "the page did not connect again without the microphone")
    assert playing(browser) == sid
    assert media(browser)["transceivers"] == [["audio", "recvonly", None], ["video", "recvonly", None]]
    assert browser.find_element(By.ID, "live-mic").text == "Speak (microphone)"
    wait_until(browser, lambda d: session_state(server, sid).json()["viewers"] == 1, 30, "a viewer stayed")
    assert errors_logged(browser) == []


def test_a_server_with_a_token(browser, assets):
    """Opened as /?token=TOKEN, the live mode passes the token on (session, offer, speech, state,
    viewer and session deletes: Bearer header); the address that joins the session keeps the token in
    the query and the session id in the fragment (which no request carries), and a tab opened at it
    plays the session; an unknown id and an ended session are errors on the page."""
    server = Server(assets["ckpt"], assets["dir"] / "avatars_token", assets["dir"] / "server_token.log",
                    "--token", TOKEN)
    try:
        with open(assets["photo"], "rb") as fh:
            r = httpx.post(server.url + "/v1/avatars", files={"file": ("face.png", fh)}, data={"box": BOX},
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        assert r.status_code == 201, r.text
        sid = start_live(browser, server, r.json()["avatar_id"], f"/?token={TOKEN}")
        assert browser.current_url == f"{server.url}/?token={TOKEN}#session={sid}"
        assert session_state(server, sid).status_code == 401
        assert session_state(server, sid, TOKEN).json()["viewers"] == 1
        browser.refresh()                 # the address joins the session again
        assert playing(browser) == sid
        choose_and_say(browser, assets["speech"])
        wait_until(browser, lambda d: session_state(server, sid, TOKEN).json()["spoken"] == 1, 60, "no speech")

        browser.find_element(By.ID, "live-id").clear()
        browser.find_element(By.ID, "live-id").send_keys("live-000000000000")
        browser.find_element(By.ID, "live-watch").click()
        wait_until(browser, lambda d: state(d) == "error", 30, "no error for an unknown session")
        assert "HTTP 404" in browser.find_element(By.ID, "error").text
        assert browser.current_url == f"{server.url}/?token={TOKEN}"
        browser.get_log("browser")

        browser.find_element(By.ID, "live-id").clear()
        browser.find_element(By.ID, "live-id").send_keys(sid)
        browser.find_element(By.ID, "live-watch").click()
        assert playing(browser) == sid
        browser.find_element(By.ID, "live-end").click()
        wait_state(browser, ("idle",), 30)
        assert session_state(server, sid, TOKEN).status_code == 404
        assert browser.current_url == f"{server.url}/?token={TOKEN}"
        assert errors_logged(browser) == []
    finally:
        server.stop()
