"""Environment switches of samoyeds_vllm.envs (CPU)."""

from samoyeds_vllm import envs


def test_extra_nvcc_flags_split_like_a_shell(monkeypatch):
    monkeypatch.setenv("SAMOYEDS_EXTRA_NVCC_FLAGS", "-DSAMOYEDS_PIPE_SAMOYEDS=442  -Xptxas '-v'")
    assert envs.extra_nvcc_flags() == ["-DSAMOYEDS_PIPE_SAMOYEDS=442", "-Xptxas", "-v"]
    monkeypatch.delenv("SAMOYEDS_EXTRA_NVCC_FLAGS")
    assert envs.extra_nvcc_flags() == []


def test_build_dir_unset_or_empty_means_torch_default(monkeypatch):
    monkeypatch.setenv("SAMOYEDS_BUILD_DIR", "")
    assert envs.build_dir() is None
    monkeypatch.setenv("SAMOYEDS_BUILD_DIR", "/tmp/sbuild")
    assert envs.build_dir() == "/tmp/sbuild"
