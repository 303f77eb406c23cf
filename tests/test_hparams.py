import argparse

import pytest

import hparams as H

PUBLISHED_96 = dict(num_mels=80, rescale=True, rescaling_max=0.9, n_fft=800, hop_size=200, win_size=800,
                    sample_rate=16000, signal_normalization=True, allow_clipping_in_normalization=True,
                    symmetric_mels=True, max_abs_value=4.0, preemphasize=True, preemphasis=0.97,
                    min_level_db=-100, ref_level_db=20, fmin=55, fmax=7600, img_size=96, fps=25,
                    batch_size=16, initial_learning_rate=1e-4, num_workers=16, checkpoint_interval=3000,
                    eval_interval=3000, save_optimizer_state=True, syncnet_wt=0.0, syncnet_batch_size=64,
                    syncnet_lr=1e-4, syncnet_eval_interval=10000, syncnet_checkpoint_interval=10000,
                    disc_wt=0.07, disc_initial_learning_rate=1e-4)


def test_defaults_are_the_published_96_settings():
    hp = H.HParams()
    for key, value in PUBLISHED_96.items():
        assert getattr(hp, key) == value, key
    assert H.get_hparams("96") == hp
    assert hp.model_width == 1.0


def test_presets():
    assert H.get_hparams("288").img_size == 288
    tiny = H.get_hparams("tiny")
    assert tiny.img_size == 96 and tiny.model_width < 1 and tiny.batch_size < 16


def test_overrides_are_typed():
    hp = H.get_hparams("tiny", "batch_size=3, syncnet_wt=0.03,amp=bf16,rescale=false")
    assert (hp.batch_size, hp.syncnet_wt, hp.amp, hp.rescale) == (3, 0.03, "bf16", False)
    assert isinstance(hp.batch_size, int) and isinstance(hp.syncnet_wt, float)


@pytest.mark.parametrize("text,match", [
    ("batchsize=3", "unknown hparam 'batchsize'"),
    ("batch_size=three", "is an int"),
    ("batch_size=2.5", "is an int"),
    ("syncnet_wt=abc", "is a float"),
    ("rescale=maybe", "is a bool"),
    ("img_size=128", "must be one of"),
    ("amp=fp8", "must be one of"),
    ("batch_size", "not key=value"),
])
def test_bad_overrides_are_errors(text, match):
    with pytest.raises(H.HParamsError, match=match):
        H.get_hparams("96", text)


def test_unknown_preset():
    with pytest.raises(H.HParamsError, match="unknown preset"):
        H.get_hparams("512")


def test_round_trip_through_a_checkpoint_dict():
    hp = H.get_hparams("tiny", "batch_size=5")
    assert H.from_dict(hp.to_dict()) == hp
    assert H.from_dict({**hp.to_dict(), "removed_in_a_later_version": 1}) == hp


def test_cli_arguments(capsys):
    parser = argparse.ArgumentParser()
    H.add_hparams_args(parser)
    args = parser.parse_args(["--preset", "tiny", "--hparams", "batch_size=2"])
    assert H.hparams_from_args(args, parser).batch_size == 2
    with pytest.raises(SystemExit):
        H.hparams_from_args(parser.parse_args(["--hparams", "nope=1"]), parser)
    assert "unknown hparam 'nope'" in capsys.readouterr().err


def test_audio_front_end_is_defined_once():
    import audio

    assert audio.SAMPLE_RATE == H.SAMPLE_RATE == H.HParams().sample_rate == 16000
    assert (audio.HOP_SIZE, audio.WIN_SIZE, audio.NUM_MELS, audio.MEL_STEP_SIZE) == (200, 800, 80, 16)
    assert audio.mel_columns_per_second() == 80
    assert set(audio.mel_params()) == set(H.AUDIO_KEYS)


@pytest.mark.parametrize("preset", ["96", "288"])
@pytest.mark.parametrize("override", ["sample_rate=22050", "hop_size=160", "fmax=8000", "symmetric_mels=false"])
def test_audio_overrides_are_refused_for_published_layouts(preset, override):
    with pytest.raises(H.HParamsError, match=f"published {preset} layout"):
        H.get_hparams(preset, override)


def test_audio_overrides_under_the_tiny_preset():
    assert H.get_hparams("tiny", "hop_size=160,fmax=8000").hop_size == 160
    for fixed in ("num_mels=40", "syncnet_mel_step_size=20"):
        with pytest.raises(H.HParamsError, match="80-band, 16-column"):
            H.get_hparams("tiny", fixed)
    assert H.get_hparams("96", "sample_rate=16000").sample_rate == 16000  # the published value is fine
