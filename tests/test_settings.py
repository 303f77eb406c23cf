"""Every inference setting is declared once (lipsync/render/settings.py): the flags of inference.py,
InferenceConfig's fields, what avatar.json records and the server's form fields take their names and
defaults from it; ``--preset published`` is parity mode; avatar.json files written before the
settings were declared once read back the same."""
import argparse
import dataclasses
import json

import pytest

import inference
from lipsync.core.settings import SettingError
from lipsync.render.avatar import settings_from_record
from lipsync.render.avatar_settings import AvatarSettings, settings_from_flags
from lipsync.render.boxes import DetectionSettings
from lipsync.media.frames import FrameTransform
from lipsync.render.inference import InferenceConfig
from lipsync.render.settings import AVATAR, DEFAULT_DET_EVERY, DEFAULTS, INFERENCE, SETTINGS

AUTO = {"det_every", "det_scale"}  # their defaults mean "decide": the avatar records what was decided


def parse(*flags):
    return inference.build_parser().parse_args(["--checkpoint_path", "g.pth", "--face", "f.mp4", "--audio", "a.wav",
                                                *flags])


def config(*flags):
    argv = ["--checkpoint_path", "g.pth", "--face", "f.mp4", "--audio", "a.wav", *flags]
    return inference.config_of(parse(*flags), inference.explicit_flags(argv))


def as_flag(value):
    return list(value) if isinstance(value, tuple) else value


def test_the_flags_are_the_settings():
    parser = inference.build_parser()
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    assert list(actions) == [s.name for s in INFERENCE] + ["ffmpeg"]
    for s in INFERENCE:
        assert actions[s.name].option_strings == [s.flag] and actions[s.name].help == s.help
        assert actions[s.name].default == as_flag(s.default), s.name


def test_each_default_comes_from_one_place():
    """The command line, InferenceConfig, the avatar record and the server agree on every default."""
    args = vars(parse())
    fields = {f.name: f.default for f in dataclasses.fields(InferenceConfig)}
    cfg = InferenceConfig(checkpoint_path="g.pth", audio="a.wav")
    for s in INFERENCE:
        if s.field:
            assert fields[s.name] == s.default and getattr(cfg, s.name) == s.default, s.name
        if not s.required and s.name not in ("face", "audio"):
            assert as_flag(args[s.name]) == as_flag(s.default), s.name
    recorded = settings_from_flags({}).record()
    published = AvatarSettings().record()
    for s in AVATAR:
        expected = DEFAULT_DET_EVERY if s.name == "det_every" else s.default
        assert recorded[s.name] == as_flag(expected), s.name
        if s.name not in AUTO:
            assert published[s.name] == as_flag(s.default), s.name
    assert DetectionSettings().jump_iou == SETTINGS["det_jump_iou"].default
    assert DetectionSettings().detector == DEFAULTS["face_detector"]
    assert cfg.avatar_settings() == settings_from_flags({})


def test_preset_published_is_parity_mode():
    preset, spelled = config("--preset", "published"), config("--blend", "none", "--loop", "repeat")
    assert preset.parity and spelled.parity and not config().parity
    assert (preset.blend, preset.loop) == ("none", "repeat")
    assert preset.avatar_settings() == spelled.avatar_settings()
    assert preset.generator_precision == spelled.generator_precision == "fp32"
    det = preset.avatar_settings().detection
    assert (det.every, det.scale, det.half) == (1, 1.0, False)  # every frame, full size, fp32
    # the flags the preset sets may be repeated, not contradicted
    assert config("--preset", "published", "--blend", "none").parity
    with pytest.raises(SettingError, match="--preset published means --blend none"):
        config("--preset", "published", "--blend", "feather")
    with pytest.raises(SettingError, match="--preset published"):
        InferenceConfig(checkpoint_path="g.pth", audio="a.wav", preset="published", loop="pingpong")


def test_the_avatar_flags_given_are_compared_by_their_recorded_names():
    given = inference.explicit_flags(["--avatar", "a", "--pads", "0", "20", "0", "0", "--det_jump_iou", "0.5",
                                      "--wav2lip_batch_size", "8"])
    assert inference.avatar_wanted(given) == {"pads": [0, 20, 0, 0], "det_jump_iou": 0.5}


# avatar.json "settings" as written before the settings were declared once (the same key names)
OLD_RECORDS = [
    ('{"fps": 25.0, "static": false, "resize_factor": 1, "rotate": false, "crop": [0, -1, 0, -1], "pads": [0, 10, 0, '
     '0], "nosmooth": false, "box": [-1, -1, -1, -1], "face_detector": "lbp", "det_scale": 0.0, "det_every": 5, '
     '"det_jump_iou": 0.7, "detector_weights": []}',
     AvatarSettings(detection=DetectionSettings(detector="lbp", scale=0.0, every=5))),
    ('{"fps": 30.0, "static": true, "resize_factor": 2, "rotate": true, "crop": [0, 200, 10, -1], "pads": [0, 20, 0, '
     '0], "nosmooth": true, "box": [40, 200, 60, 196]}',
     AvatarSettings(fps=30.0, static=True, transform=FrameTransform(2, True, (0, 200, 10, -1)), pads=(0, 20, 0, 0),
                    nosmooth=True, box=(40, 200, 60, 196))),
    ('{"fps": 25.0, "static": false, "resize_factor": 1, "rotate": false, "crop": [0, -1, 0, -1], "pads": [0, 10, 0, '
     '0], "nosmooth": false, "box": [-1, -1, -1, -1], "face_detector": "sfd", "det_scale": 1.0, "det_every": 1, '
     '"det_jump_iou": 0.5, "detector_weights": []}',
     AvatarSettings(detection=DetectionSettings(jump_iou=0.5))),
]


@pytest.mark.parametrize("text,expected", OLD_RECORDS)
def test_avatar_records_written_before_read_back_the_same(text, expected):
    record = json.loads(text)
    settings = settings_from_record(record)
    assert settings == expected
    # the same keys and values (compared by value, whatever their order), and the face chosen since
    # --target_face exists (largest: the one face such an avatar was made with) where detection is recorded
    added = {"target_face": "largest"} if "face_detector" in record else {}
    assert settings.record() == {**record, **added}


def test_a_damaged_record_is_refused():
    from lipsync.render.avatar import AvatarError

    record = json.loads(OLD_RECORDS[1][0])
    for damage in ({"pads": [0, 1]}, {"fps": "fast"}, {"box": None}):
        with pytest.raises(AvatarError, match="damaged"):
            settings_from_record({**record, **damage})
    with pytest.raises(AvatarError, match="damaged"):
        settings_from_record({k: v for k, v in record.items() if k != "nosmooth"})


def test_the_det_scale_flag():
    assert parse("--det_scale", "auto").det_scale == 0.0 and parse("--det_scale", "0.5").det_scale == 0.5
    with pytest.raises(SystemExit):
        parse("--det_scale", "2")
    with pytest.raises(argparse.ArgumentTypeError):
        SETTINGS["det_scale"].parse("big")


def test_the_server_forms_take_the_same_defaults():
    """An upload form's fields (box, fps) and the avatar settings the server prepares with are the
    flags', with the server's detector."""
    pytest.importorskip("fastapi")
    from types import SimpleNamespace

    from lipsync.serve.state import ApiError, ServerConfig
    from lipsync.serve.uploads import FORM_FIELDS, Uploads, form_setting

    for name in FORM_FIELDS:
        assert form_setting({}, name) == form_setting({name: " "}, name) == DEFAULTS[name]
    assert form_setting({"box": "1, 2 3 4"}, "box") == (1, 2, 3, 4) and form_setting({"fps": "30"}, "fps") == 30.0
    for name, text in [("box", "1 2 3"), ("fps", "-5"), ("fps", "abc")]:
        with pytest.raises(ApiError, match=f"{name} must be"):
            form_setting({name: text}, name)
    uploads = Uploads(SimpleNamespace(config=ServerConfig(face_detector="lbp")))
    cfg = InferenceConfig(checkpoint_path="g.pth", audio="a.wav", face_detector="lbp")
    assert settings_from_flags(uploads.flags({})) == cfg.avatar_settings()


def test_the_server_takes_the_shared_flags_from_the_inference_settings():
    """serve.py's generator and detector flags, the server's config and the stream options use the
    inference defaults and choices (one declaration)."""
    import serve
    from lipsync.serve.state import ServerConfig
    from lipsync.serve.stream_output import StreamOptions

    served = serve.build_parser().parse_args(["--checkpoint_path", "g.pth"])
    inferred = parse()
    for name in serve.SHARED_FLAGS + ("checkpoint_path",):
        assert getattr(served, name) == getattr(inferred, name), name
    actions = {a.dest: a for a in serve.build_parser()._actions}
    assert actions["face_detector"].choices == SETTINGS["face_detector"].choices
    assert ServerConfig().face_detector == DEFAULTS["face_detector"]
    assert (StreamOptions().blend, StreamOptions().loop) == (DEFAULTS["blend"], DEFAULTS["loop"])


def test_det_scale_zero_means_auto_as_its_help_says():
    assert parse("--det_scale", "0").det_scale == parse("--det_scale", "auto").det_scale == 0.0
    with pytest.raises(SystemExit):
        parse("--det_scale", "1.5")
