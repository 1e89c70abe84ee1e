"""Every flag `vllm serve` has in vLLM v0.11.0 (generated data, not code to edit by hand).

Extracted from the v0.11.0 sources on PyPI (vllm-0.11.0.tar.gz): each `add_argument` of
vllm/engine/arg_utils.py (EngineArgs and AsyncEngineArgs.add_cli_args, with `--no-<flag>` for the
BooleanOptionalAction ones: EngineArgs fields typed bool) and of
vllm/entrypoints/openai/cli_args.py (make_arg_parser, and FrontendArgs' fields). The lab engine
honours a few of them (labengine/cli.py HONOURED), accepts and ignores the others, and refuses
anything else as vLLM's argparse does ("unrecognized arguments").
"""

VLLM_VERSION = "0.11.0"

# Flags that take a value.
VALUE_FLAGS = frozenset({
    "--additional-config", "--allowed-headers", "--allowed-local-media-path",
    "--allowed-media-domains", "--allowed-methods", "--allowed-origins", "--api-key",
    "--api-server-count", "--block-size", "--chat-template", "--chat-template-content-format",
    "--code-revision", "--collect-detailed-traces", "--compilation-config", "--config",
    "--config-format", "--convert", "--cpu-offload-gb", "--cuda-graph-sizes",
    "--data-parallel-address", "--data-parallel-backend", "--data-parallel-rank",
    "--data-parallel-rpc-port", "--data-parallel-size", "--data-parallel-size-local",
    "--data-parallel-start-rank", "--dbo-decode-token-threshold", "--dbo-prefill-token-threshold",
    "--decode-context-parallel-size", "--default-mm-loras", "--distributed-executor-backend",
    "--download-dir", "--dtype", "--eplb-config", "--eplb-step-interval", "--eplb-window-size",
    "--expert-placement-strategy", "--generation-config", "--gpu-memory-utilization",
    "--h11-max-header-count", "--h11-max-incomplete-event-size", "--hf-config-path",
    "--hf-overrides", "--hf-token", "--host", "--ignore-patterns", "--io-processor-plugin",
    "--kv-cache-dtype", "--kv-cache-memory-bytes", "--kv-events-config", "--kv-transfer-config",
    "--limit-mm-per-prompt", "--load-format", "--log-config-file", "--logits-processor-pattern",
    "--logits-processors", "--logprobs-mode", "--long-prefill-token-threshold", "--lora-dtype",
    "--lora-extra-vocab-size", "--lora-modules", "--mamba-cache-dtype", "--mamba-ssm-cache-dtype",
    "--max-cpu-loras", "--max-log-len", "--max-logprobs", "--max-long-partial-prefills",
    "--max-lora-rank", "--max-loras", "--max-model-len", "--max-num-batched-tokens",
    "--max-num-partial-prefills", "--max-num-seqs", "--max-parallel-loading-workers",
    "--media-io-kwargs", "--middleware", "--mm-encoder-tp-mode", "--mm-processor-cache-gb",
    "--mm-processor-cache-type", "--mm-processor-kwargs", "--mm-shm-cache-max-object-size-mb",
    "--model", "--model-impl", "--model-loader-extra-config", "--num-gpu-blocks-override",
    "--num-lookahead-slots", "--num-redundant-experts", "--otlp-traces-endpoint",
    "--override-attention-dtype", "--override-generation-config", "--override-pooler-config",
    "--pipeline-parallel-size", "--pooler-config", "--port", "--prefix-caching-hash-algo",
    "--pt-load-map-location", "--quantization", "--reasoning-parser", "--response-role",
    "--revision", "--root-path", "--rope-scaling", "--rope-theta", "--runner",
    "--safetensors-load-strategy", "--scheduler-cls", "--scheduling-policy", "--seed",
    "--served-model-name", "--show-hidden-metrics-for-version", "--speculative-config",
    "--ssl-ca-certs", "--ssl-cert-reqs", "--ssl-certfile", "--ssl-keyfile",
    "--structured-outputs-config", "--swap-space", "--task", "--tensor-parallel-size",
    "--tokenizer", "--tokenizer-mode", "--tokenizer-revision", "--tool-call-parser",
    "--tool-parser-plugin", "--tool-server", "--uds", "--uvicorn-log-level",
    "--video-pruning-rate", "--worker-cls", "--worker-extension-cls", "-O", "-asc", "-dcp", "-dp",
    "-dpa", "-dpb", "-dpl", "-dpn", "-dpp", "-dpr", "-pp", "-q", "-tp",
})

# Flags that take none (store_true, and both forms of each BooleanOptionalAction).
BOOL_FLAGS = frozenset({
    "--allow-credentials", "--async-scheduling", "--calculate-kv-scales",
    "--data-parallel-hybrid-lb", "--disable-cascade-attn", "--disable-chunked-mm-input",
    "--disable-custom-all-reduce", "--disable-fastapi-docs", "--disable-frontend-multiprocessing",
    "--disable-hybrid-kv-cache-manager", "--disable-log-requests", "--disable-log-stats",
    "--disable-mm-preprocessor-cache", "--disable-sliding-window", "--disable-uvicorn-access-log",
    "--enable-auto-tool-choice", "--enable-chunked-prefill", "--enable-dbo", "--enable-eplb",
    "--enable-expert-parallel", "--enable-force-include-usage", "--enable-log-outputs",
    "--enable-log-requests", "--enable-lora", "--enable-lora-bias",
    "--enable-multimodal-encoder-data-parallel", "--enable-prefix-caching",
    "--enable-prompt-embeds", "--enable-prompt-tokens-details", "--enable-request-id-headers",
    "--enable-server-load-tracking", "--enable-sleep-mode", "--enable-ssl-refresh",
    "--enable-tokenizer-info-endpoint", "--enforce-eager", "--eplb-log-balancedness",
    "--exclude-tools-when-tool-choice-none", "--fully-sharded-loras", "--headless",
    "--interleave-mm-strings", "--kv-sharing-fast-prefill", "--log-error-stack",
    "--no-allow-credentials", "--no-async-scheduling", "--no-calculate-kv-scales",
    "--no-data-parallel-hybrid-lb", "--no-disable-cascade-attn", "--no-disable-chunked-mm-input",
    "--no-disable-custom-all-reduce", "--no-disable-fastapi-docs",
    "--no-disable-frontend-multiprocessing", "--no-disable-hybrid-kv-cache-manager",
    "--no-disable-log-requests", "--no-disable-sliding-window", "--no-disable-uvicorn-access-log",
    "--no-enable-auto-tool-choice", "--no-enable-chunked-prefill", "--no-enable-dbo",
    "--no-enable-eplb", "--no-enable-expert-parallel", "--no-enable-force-include-usage",
    "--no-enable-log-outputs", "--no-enable-log-requests", "--no-enable-lora",
    "--no-enable-lora-bias", "--no-enable-prefix-caching", "--no-enable-prompt-embeds",
    "--no-enable-prompt-tokens-details", "--no-enable-request-id-headers",
    "--no-enable-server-load-tracking", "--no-enable-sleep-mode", "--no-enable-ssl-refresh",
    "--no-enable-tokenizer-info-endpoint", "--no-enforce-eager", "--no-eplb-log-balancedness",
    "--no-exclude-tools-when-tool-choice-none", "--no-fully-sharded-loras",
    "--no-interleave-mm-strings", "--no-kv-sharing-fast-prefill", "--no-log-error-stack",
    "--no-ray-workers-use-nsight", "--no-return-tokens-as-token-ids", "--no-skip-mm-profiling",
    "--no-skip-tokenizer-init", "--no-trust-remote-code", "--no-trust-request-chat-template",
    "--no-use-tqdm-on-load", "--ray-workers-use-nsight", "--return-tokens-as-token-ids",
    "--skip-mm-profiling", "--skip-tokenizer-init", "--trust-remote-code",
    "--trust-request-chat-template", "--use-tqdm-on-load",
})
