"""gpu-fleet lab CPU engine: a LAB STAND-IN for vLLM's OpenAI-compatible server (not vLLM).

It runs the lab's tiny Llama model for real on the CPU (numpy forward pass, the `tokenizers`
library, the model's own chat template) behind the HTTP API the stack and the smoke tests use,
started with vLLM's command line (`vllm serve MODEL ...`).

Pure modules (standard library only, unit-tested in the project's venv):
    cli.py        the `vllm serve` command line and VLLM_API_KEY
    protocol.py   request validation, response and SSE shapes, stop strings, the chat template
    formats.py    safetensors and config.json reading without numpy
    app.py        the ASGI application (auth, routes, generation loop) over an engine object
Modules that need numpy / tokenizers (the image only):
    model.py      the Llama forward pass with a KV cache, and sampling
    engine.py     tokenizer + model + chat template: what app.py drives
    __main__.py   `vllm` -> parse, load, serve with uvicorn
"""

VERSION = "0.11.0+gpufleet.lab"  # the vLLM API release it imitates, marked as the lab's
STAND_IN = "gpufleet lab CPU engine"
STAND_IN_NOTICE = ("LAB STAND-IN: this is the gpu-fleet lab CPU engine (numpy), not vLLM; "
                   "it imitates vLLM's OpenAI-compatible server for the lab's tiny model")
