"""Development kit shared by the tests, the scripts and the benchmarks (never imported by the pack itself).

- Running ComfyUI: `comfy_runtime` (booted in this process, graphs through ComfyUI's own executor),
  `comfy_server` (a real HTTP server subprocess), `paths` (which ComfyUI, throw-away base directories),
  `graph` (API-format graph builder), `ui_workflow` (UI workflow files -> API graphs as the frontend queues them),
  `example_job` (the headless example workflow run).
- Tiny checkpoints of the real architectures, generated, never downloaded: `tiny_models`, `tiny_vlm`,
  `tiny_model_patches` (the ComfyUI patches that read their sizes), and `tiny_dataset`.
- `core_toys`: pure-torch stand-ins for a flow model, for the core's tests and benchmark.
"""
