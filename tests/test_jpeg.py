"""JPEG inputs without torch: the framing of variable-length files in a fixed uint8 vector, the
naming rule load generators follow, and the inputs the generators and load generators send."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from common import jpeg
from common.dtypes import array_from_wire
from common.errors import InvalidArgument
from contract.pipeline_config import load_pipeline, pipelines_dir
from loadgen.inputs import make_input
from protos import tensor_pb2
from services.pipelines import runner

TORCH_PIPELINES = sorted(p.stem for p in (pipelines_dir() / "torch").glob("*.yaml"))


def decoded(vector: np.ndarray) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg.unpack(vector))).convert("RGB"))


def test_a_packed_jpeg_unpacks_to_the_same_file_and_decodes_to_its_image_size():
    image = jpeg.synthetic_image(np.random.default_rng(0), 48, 80)
    data = jpeg.encode(image)
    vector = jpeg.pack(data, 8192)
    assert vector.dtype == np.uint8 and vector.shape == (8192,)
    assert jpeg.unpack(vector) == data
    assert not vector[jpeg.HEADER_BYTES + len(data) :].any()
    assert decoded(vector).shape == (48, 80, 3)


def test_lengths_of_a_batch_read_only_the_headers():
    files = [b"\xff\xd8abc", b"", b"\xff\xd8" + b"x" * 100]
    batch = np.stack([jpeg.pack(f, 256) for f in files])
    assert jpeg.lengths(batch[:, : jpeg.HEADER_BYTES], 256).tolist() == [5, 0, 102]


def test_an_all_zero_vector_is_no_image():
    assert jpeg.unpack(np.zeros(64, np.uint8)) == b""


def test_a_jpeg_longer_than_the_vector_is_invalid_argument():
    with pytest.raises(InvalidArgument) as e:
        jpeg.pack(b"x" * 61, 64)
    assert e.value.code.name == "INVALID_ARGUMENT"


def test_a_header_claiming_more_than_fits_is_invalid_argument_naming_the_row():
    batch = np.zeros((2, 64), np.uint8)
    batch[1, :4] = np.frombuffer((61).to_bytes(4, "little"), np.uint8)
    with pytest.raises(InvalidArgument, match="row 1"):
        jpeg.lengths(batch, 64)


def test_input_names_say_which_specs_are_jpegs_and_their_frame_size():
    assert jpeg.is_jpeg_input("jpeg", np.uint8, (1024,))
    assert jpeg.is_jpeg_input("jpeg_720x1280", np.uint8, (1024,))
    assert not jpeg.is_jpeg_input("jpeg_720x1280", np.float32, (1024,))
    assert not jpeg.is_jpeg_input("frame", np.uint8, (1024,))
    assert not jpeg.is_jpeg_input("jpeg", np.uint8, (32, 32))
    assert jpeg.frame_size("jpeg_720x1280") == (720, 1280)
    assert jpeg.frame_size("jpeg") is None


def test_the_load_generator_sends_a_decodable_jpeg_of_the_named_frame_size():
    spec = tensor_pb2.TensorSpec(name="jpeg_72x96", dtype=tensor_pb2.DTYPE_UINT8, shape=[16384])
    wire = make_input(spec, np.random.default_rng(1))
    vector = array_from_wire(wire)
    assert vector.shape == (16384,)
    assert decoded(vector).shape == (72, 96, 3)


def test_there_are_three_torch_pipelines():
    assert TORCH_PIPELINES == [
        "torch-captioning",
        "torch-speech-to-text",
        "torch-video-analytics",
    ]


@pytest.mark.parametrize("name", TORCH_PIPELINES)
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_each_torch_pipelines_generator_makes_its_input_spec(name, size):
    pipe = load_pipeline(str(pipelines_dir() / "torch" / f"{name}.yaml"), size)
    item = runner.make_input(pipe, 0)  # checks dtype and shape against the spec
    # the target follows the reference pipelines' rule, measured on the H200 (torch-e2e)
    assert "2.5 x the p99" in pipe.qos_note and "H200" in pipe.qos_note
    if size == "full":
        assert f"-> {pipe.qos_p99_ms:g} ms" in pipe.qos_note
    if jpeg.is_jpeg_input(pipe.input.name, item.dtype, item.shape):
        assert decoded(item).shape[:2] == jpeg.frame_size(pipe.input.name)
