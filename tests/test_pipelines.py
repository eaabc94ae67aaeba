"""Pipeline configs (parsing, validation, DAG order) and the in-process reference runner."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import yaml

from common.backend import Backend
from common.errors import InvalidArgument, NotFound
from contract.pipeline_config import (
    list_pipelines,
    load_config,
    load_pipeline,
    parse_config,
    pipelines_dir,
)
from services.pipelines.runner import (
    build_models,
    clear_cache,
    make_input,
    output_spec,
    run_direct,
    stage_feeds,
)
from services.stage.plugin import ModelContext

CTX = ModelContext(Backend.HOST, np)
NAMES = ["img-to-text", "speech-to-text", "text-to-img", "video-analytics"]
EXPECTED_OUTPUT = {
    "img-to-text": (np.int32, (8,)),
    "speech-to-text": (np.int32, (8,)),
    "text-to-img": (np.uint8, (32, 32, 3)),
    "video-analytics": (np.int32, (4,)),
}


def base_config():
    return {
        "name": "demo",
        "generator": "services.pipelines.generators:frame",
        "output": "classify.classes",
        "stages": [
            {"name": "detect", "model": "m.v:detector", "inputs": {"frame": "input"}},
            {
                "name": "crop",
                "model": "m.v:crop",
                "inputs": {"frame": "input", "boxes": "detect.boxes"},
            },
            {"name": "classify", "model": "m.v:classifier", "inputs": {"crops": "crop.crops"}},
        ],
        "sizes": {
            "tiny": {
                "qos_p99_ms": 100,
                "input": {"name": "frame", "dtype": "uint8", "shape": [8, 8, 3]},
                "options": {"detect": {"proposals": 2}},
            }
        },
    }


def test_bundled_pipelines_are_listed():
    assert list_pipelines() == NAMES
    assert (pipelines_dir() / "img-to-text.yaml").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_every_tiny_pipeline_runs_directly_with_its_output_spec(name):
    pipeline = load_pipeline(name, "tiny")
    item = make_input(pipeline, 7)
    out = run_direct(pipeline, CTX, item)
    dtype, shape = EXPECTED_OUTPUT[name]
    assert out.dtype == dtype and out.shape == shape
    spec = output_spec(pipeline, CTX)
    assert spec.dtype == out.dtype and spec.shape == out.shape
    np.testing.assert_array_equal(run_direct(pipeline, CTX, item), out)  # repeatable
    assert pipeline.qos_p99_ms > 0 and pipeline.qos_note


@pytest.mark.parametrize("name", NAMES)
def test_full_sizes_are_wired_consistently(name):
    """Builds the full models on the host (no run): every stage's specs must chain up."""
    pipeline = load_pipeline(name, "full")
    models = build_models(pipeline, ModelContext(Backend.HOST, np, size="full"))
    assert set(models) == {s.name for s in pipeline.stages}
    assert make_input(pipeline, 0).shape == pipeline.input.shape
    clear_cache()  # full weights are tens of MB


def test_generators_are_seeded():
    for name in NAMES:
        p = load_pipeline(name)
        np.testing.assert_array_equal(make_input(p, 1), make_input(p, 1))
        assert not np.array_equal(make_input(p, 1), make_input(p, 2))


def test_sizes_apply_options_and_targets():
    tiny, full = load_pipeline("img-to-text", "tiny"), load_pipeline("img-to-text", "full")
    assert tiny.stage("encode").options["image_size"] == 32
    assert full.stage("encode").options["image_size"] == 224
    assert tiny.input.shape == (40, 40, 3) and full.input.shape == (768, 768, 3)
    assert tiny.size == "tiny" and full.size == "full"
    with pytest.raises(NotFound):
        tiny.stage("nope")


def test_stages_come_in_topological_order():
    cfg = base_config()
    cfg["stages"].reverse()  # classify, crop, detect
    parsed = parse_config(cfg, "demo.yaml")
    assert [s.name for s in parsed.stages] == ["detect", "crop", "classify"]
    assert parsed.stages[1].upstream() == ("detect",)
    resolved = parsed.resolve("tiny")
    assert resolved.stage("detect").options == {"proposals": 2}
    assert resolved.output_ref == ("classify", "classes")
    pickle.loads(pickle.dumps(resolved))  # travels to other processes


def test_video_analytics_is_a_dag_reading_the_query_input_twice():
    p = load_pipeline("video-analytics")
    assert p.stage("crop").inputs == {"frame": "input", "boxes": "detect.boxes"}


def broken(mutate):
    cfg = copy.deepcopy(base_config())
    mutate(cfg)
    return cfg


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: c["stages"][1]["inputs"].update(boxes="nowhere.b"), "stages[1].inputs.boxes"),
        (lambda c: c["stages"][1]["inputs"].update(boxes="detect"), "stages[1].inputs.boxes"),
        (lambda c: c["stages"][0]["inputs"].update(frame="classify.classes"), "stages"),
        (lambda c: c["stages"][0]["inputs"].update(frame="detect.boxes"), "stages[0].inputs.frame"),
        (lambda c: c.pop("output"), "output"),
        (lambda c: c.update(output="missing.out"), "output"),
        (lambda c: c.update(output="input"), "output"),
        (lambda c: c["sizes"]["tiny"]["input"].update(dtype="complex64"), "sizes.tiny.input.dtype"),
        (lambda c: c["sizes"]["tiny"]["input"].update(shape=[8, -1]), "sizes.tiny.input.shape"),
        (lambda c: c["sizes"]["tiny"].update(qos_p99_ms=0), "sizes.tiny.qos_p99_ms"),
        (lambda c: c["sizes"]["tiny"]["options"].update(ghost={}), "sizes.tiny.options.ghost"),
        (lambda c: c["stages"][2].update(name="detect"), "stages[2].name"),
        (lambda c: c["stages"][2].update(name="input"), "stages[2].name"),
        (lambda c: c["stages"][0].update(model="not a path"), "stages[0].model"),
        (lambda c: c["stages"][0].update(max_batch=0), "stages[0].max_batch"),
        (lambda c: c["stages"][0].update(batch=4), "stages[0]"),
        (lambda c: c.update(extra=1), "top level"),
        (lambda c: c.update(stages=[]), "stages"),
        (lambda c: c.update(sizes={}), "sizes"),
        (lambda c: c["stages"].append({"name": "dead", "model": "m:f", "inputs": {"x": "input"}}),
         "stages"),
    ],
)  # fmt: skip
def test_invalid_configs_name_the_file_and_field(mutate, field):
    with pytest.raises(InvalidArgument) as err:
        parse_config(broken(mutate), "demo.yaml")
    assert err.value.message.startswith(f"demo.yaml: {field}:"), err.value.message


def test_load_errors(tmp_path):
    with pytest.raises(NotFound):
        load_pipeline("no-such-pipeline")
    with pytest.raises(NotFound):
        load_pipeline(str(tmp_path / "absent.yaml"))
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(InvalidArgument, match="bad.yaml"):
        load_config("bad", directory=tmp_path)
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(base_config()))
    with pytest.raises(InvalidArgument, match="differs from the file name"):
        load_config(str(tmp_path / "other.yaml"))
    with pytest.raises(InvalidArgument, match="no size 'huge'"):
        load_pipeline("img-to-text", "huge")


def test_explicit_directory(tmp_path):
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(base_config()))
    assert list_pipelines(tmp_path) == ["demo"]
    assert load_pipeline("demo", directory=tmp_path).input.shape == (8, 8, 3)


def write_variant(tmp_path, name, mutate):
    data = yaml.safe_load((pipelines_dir() / f"{name}.yaml").read_text())
    mutate(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_pipeline(str(path), "tiny")


def test_wiring_mismatches_are_caught_when_models_are_built(tmp_path):
    # the decoder told to expect a different width than the encoder gives
    p = write_variant(
        tmp_path,
        "img-to-text",
        lambda d: d["sizes"]["tiny"]["options"]["decode"].update(d_model=64),
    )
    with pytest.raises(InvalidArgument, match="stage 'decode': input 'features'"):
        build_models(p, CTX)
    # a wired input the model does not have
    p = write_variant(
        tmp_path, "text-to-img", lambda d: d["stages"][1]["inputs"].update(extra="encode.text")
    )
    with pytest.raises(InvalidArgument, match="stage 'generate'"):
        build_models(p, CTX)
    # an option the factory does not take
    p = write_variant(
        tmp_path, "speech-to-text", lambda d: d["sizes"]["tiny"]["options"]["decode"].update(beam=4)
    )
    with pytest.raises(InvalidArgument, match="beam"):
        build_models(p, CTX)
    # the query input differing from the first stage's input
    p = write_variant(
        tmp_path, "video-analytics", lambda d: d["sizes"]["tiny"]["input"].update(shape=[32, 32, 3])
    )
    with pytest.raises(InvalidArgument, match="stage 'detect'"):
        build_models(p, CTX)


def test_run_direct_refuses_a_wrong_input():
    p = load_pipeline("text-to-img")
    with pytest.raises(InvalidArgument, match="int32"):
        run_direct(p, CTX, np.zeros(8, np.int64))
    with pytest.raises(InvalidArgument):
        run_direct(p, CTX, np.zeros(9, np.int32))


def test_stage_feeds_are_what_the_stage_gets_in_a_full_run() -> None:
    pipeline = load_pipeline("video-analytics", "tiny")
    ctx = CTX
    batch = np.stack([make_input(pipeline, s) for s in range(3)])
    feeds = stage_feeds(pipeline, ctx, batch, "crop")
    assert set(feeds) == {"frame", "boxes"}
    np.testing.assert_array_equal(feeds["frame"], batch)  # the DAG's edge from the input
    detect = build_models(pipeline, ctx)["detect"].infer({"frame": batch})
    np.testing.assert_array_equal(feeds["boxes"], detect["boxes"])
    assert stage_feeds(pipeline, ctx, batch, "detect").keys() == {"frame"}
    with pytest.raises(InvalidArgument, match="no stage 'nope'"):
        stage_feeds(pipeline, ctx, batch, "nope")
