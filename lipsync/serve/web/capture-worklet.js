// AudioWorklet processor of the web page's microphone path: hands the microphone's samples (the
// first channel, at the AudioContext's rate) to the page in blocks of about 20 ms; the page
// (app.js) resamples them to 16 kHz and streams them to the server. Posting every 128-sample
// render quantum would be ~350 messages a second; 20 ms blocks add at most 20 ms of delay.
class PcmCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(Math.max(128, Math.round(sampleRate / 50)));
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      let k = 0;
      while (k < channel.length) {
        const n = Math.min(channel.length - k, this.block.length - this.filled);
        this.block.set(channel.subarray(k, k + n), this.filled);
        this.filled += n;
        k += n;
        if (this.filled === this.block.length) {
          this.port.postMessage(this.block);   // a copy is sent (structured clone)
          this.filled = 0;
        }
      }
    }
    return true;   // keep running while the page listens
  }
}

registerProcessor("pcm-capture", PcmCapture);
