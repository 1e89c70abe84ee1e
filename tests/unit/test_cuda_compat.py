"""The engine image / driver table (operations/cuda_compat.py)."""

from operations import cuda_compat as cc

TABLE = {"vllm/vllm-openai:v0.11.0": "12.9", "ghcr.io/huggingface/text-generation-inference:3.3.6": "12.4"}


def test_driver_versions_compare_as_numbers():
    assert cc.version_tuple("570.172.08") > cc.version_tuple("570.26")
    assert cc.version_tuple("580.65.06") < cc.version_tuple("580.95.05")


def test_a_driver_older_than_the_images_cuda_is_refused_with_both_numbers():
    problem = cc.driver_problem("570.172.08", [("model llama", "vllm/vllm-openai:v0.11.0")], TABLE)
    assert problem.startswith("575.51.03 or later: model llama runs vllm/vllm-openai:v0.11.0, "
                              "built on CUDA 12.9")


def test_the_pinned_default_driver_runs_every_listed_image():
    images = [(name, name) for name in TABLE]
    assert cc.driver_problem("580.95.05", images, TABLE) is None
    # The first driver of CUDA 12.4 is enough for TGI 3.3.6.
    tgi = "ghcr.io/huggingface/text-generation-inference:3.3.6"
    assert cc.driver_problem("550.54.14", [("tgi", tgi)], TABLE) is None


def test_a_digest_pins_the_same_build_and_an_unlisted_image_is_not_checked():
    pinned = "vllm/vllm-openai:v0.11.0@sha256:" + "a" * 64
    assert cc.driver_problem("560.35.03", [("m", pinned)], TABLE) is not None
    assert cc.driver_problem("535.54.03", [("m", "registry.local/vllm:custom")], TABLE) is None


def test_every_cuda_version_of_the_table_has_a_driver_and_unknown_ones_are_named():
    assert all(cc.version_tuple(d) for d in cc.CUDA_MIN_DRIVER.values())
    assert cc.cuda_problem("12.9") is None
    assert "not '12.7'" in cc.cuda_problem("12.7")
