"""An independent transcription of the published inference algorithm (hold every frame, detect,
pad, smooth in place, cycle frames, hard-paste), used as the oracle for the parity test."""
import cv2
import numpy as np
import torch


def published_smoothing(boxes, T=5):
    for i in range(len(boxes)):
        if i + T > len(boxes):
            window = boxes[len(boxes) - T:]
        else:
            window = boxes[i: i + T]
        boxes[i] = np.mean(window, axis=0)
    return boxes


def published_face_boxes(frames, detections, pads, nosmooth=False):
    pady1, pady2, padx1, padx2 = pads
    results = []
    for rect, image in zip(detections, frames):
        if rect is None:
            raise ValueError("Face not detected!")
        y1 = max(0, rect[1] - pady1)
        y2 = min(image.shape[0], rect[3] + pady2)
        x1 = max(0, rect[0] - padx1)
        x2 = min(image.shape[1], rect[2] + padx2)
        results.append([x1, y1, x2, y2])
    boxes = np.array(results)
    if not nosmooth:
        boxes = published_smoothing(boxes, T=5)
    return [(y1, y2, x1, x2) for (x1, y1, x2, y2) in boxes]


def published_mel_chunks(mel, fps):
    chunks, i = [], 0
    mult = 80.0 / fps
    while True:
        start = int(i * mult)
        if start + 16 > len(mel[0]):
            chunks.append(mel[:, len(mel[0]) - 16:])
            break
        chunks.append(mel[:, start: start + 16])
        i += 1
    return chunks


def published_frames(model, frames, mel_chunks, coords, img_size=96, batch_size=128):
    """Output frames of the published loop: frames[i % len(frames)] with the generated face pasted."""
    frames = frames[: len(mel_chunks)]
    out = []
    imgs, mels, fr, cs = [], [], [], []

    def flush():
        img_batch, mel_batch = np.asarray(imgs), np.asarray(mels)
        img_masked = img_batch.copy()
        img_masked[:, img_size // 2:] = 0
        img_batch = np.concatenate((img_masked, img_batch), axis=3) / 255.0
        mel_batch = np.reshape(mel_batch, [len(mel_batch), mel_batch.shape[1], mel_batch.shape[2], 1])
        img_t = torch.FloatTensor(np.transpose(img_batch, (0, 3, 1, 2)))
        mel_t = torch.FloatTensor(np.transpose(mel_batch, (0, 3, 1, 2)))
        with torch.no_grad():
            pred = model(mel_t, img_t)
        pred = pred.cpu().numpy().transpose(0, 2, 3, 1) * 255.0
        for p, f, c in zip(pred, fr, cs):
            y1, y2, x1, x2 = c
            p = cv2.resize(p.astype(np.uint8), (x2 - x1, y2 - y1))
            f[y1:y2, x1:x2] = p
            out.append(f)
        imgs.clear(); mels.clear(); fr.clear(); cs.clear()  # noqa: E702

    for i, m in enumerate(mel_chunks):
        idx = i % len(frames)
        frame_to_save = frames[idx].copy()
        y1, y2, x1, x2 = coords[idx]
        face = cv2.resize(frames[idx][y1:y2, x1:x2], (img_size, img_size))
        imgs.append(face); mels.append(m); fr.append(frame_to_save); cs.append(coords[idx])  # noqa: E702
        if len(imgs) >= batch_size:
            flush()
    if imgs:
        flush()
    return out
