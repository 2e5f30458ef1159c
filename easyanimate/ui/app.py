"""The Gradio web UI and API: every generation kind, one generation at a time, safe to leave running.

``build_app(studio)`` lays out the page and wires its events; ``main(argv)`` parses the command line and serves
it (127.0.0.1 by default). The same events are the HTTP API: ``/generate``, ``/load_model`` and ``/refresh``
(README.md, "Web UI and API", has a ``gradio_client`` example); the original's ``/easyanimate/*`` routes are served
beside them (:mod:`easyanimate.ui.original_api`).
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import gradio as gr

from easyanimate.demo.examples import IMAGE_TEMPLATES, STEPS as DEMO_STEPS, TEXT_EXAMPLES
from easyanimate.demo.shapes import NUM_FRAMES as DEMO_FRAMES
from easyanimate.ui.generation import (
    BASE_RESOLUTIONS,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_PROMPT,
    FRAMES_RANGE,
    GUIDANCE_RANGE,
    IMAGE_TO_VIDEO,
    KINDS,
    LONG_FRAMES_MAX,
    LONG_VIDEO,
    MEMORY_MODES,
    OVERLAP_RANGE,
    SAMPLERS,
    SEED_MAX,
    SIZE_RANGE,
    STEPS_RANGE,
    STRENGTH_RANGE,
    TEXT_TO_IMAGE,
    TEXT_TO_VIDEO,
    VIDEO_TO_VIDEO,
    GenerationSettings,
    HostedLimits,
    Studio,
    easyanimate_loader,
)
from easyanimate.ui.original_api import add_original_routes
from easyanimate.ui.safety import NONE_CHOICE, RefusedError, UploadLimits

logger = logging.getLogger(__name__)

# Model switches and generations share one queue slot: neither can start while the other runs.
MODEL_SLOT = "model"
DEFAULT_MODEL_NAME = "EasyAnimateV4-demo"  # preselected when present: the small shipped demo runs on a CPU
# Starting values of width, height, frames and steps: the original's, or the demo's when the demo is preselected
# (at the original's 672 x 384 x 144 the demo would run for the better part of an hour on a CPU, and badly).
ORIGINAL_START = {"width": 672, "height": 384, "frames": 144, "steps": 30}
DEMO_START = {"width": 64, "height": 64, "frames": DEMO_FRAMES, "steps": DEMO_STEPS}


def _refusal(exc: Exception) -> gr.Error:
    """The message a user (or API client) sees for a failed request."""
    if isinstance(exc, RefusedError):
        return gr.Error(str(exc))
    logger.exception("generation failed")
    return gr.Error(f"{type(exc).__name__}: {exc}")


def build_app(studio: Studio) -> gr.Blocks:
    """The page: model and LoRA pickers, prompts, sampling settings, the generation kind and its inputs, results."""
    models = studio.model_choices()
    preselected = DEFAULT_MODEL_NAME if DEFAULT_MODEL_NAME in models else (models[0] if models else None)
    start = dict(DEMO_START if preselected == DEFAULT_MODEL_NAME else ORIGINAL_START)
    hosted = studio.hosted
    kinds, most_steps, most_frames_one_pass = list(KINDS), STEPS_RANGE[1], FRAMES_RANGE[1]
    if hosted:  # one model, no LoRA / weights pickers, no long videos, smaller ranges (enforced by the Studio)
        kinds.remove(LONG_VIDEO)
        most_steps, most_frames_one_pass = hosted.max_steps, hosted.max_frames
        start.update(steps=min(start["steps"], most_steps), frames=min(start["frames"], most_frames_one_pass))
        shrink = (hosted.max_pixels / (start["width"] * start["height"])) ** 0.5
        if shrink < 1:  # keep the aspect ratio, sides multiples of 16
            start.update(width=max(16, int(start["width"] * shrink) // 16 * 16),
                         height=max(16, int(start["height"] * shrink) // 16 * 16))

    def refresh(model, lora, weights):
        model_names, lora_names, weight_names = studio.model_choices(), studio.lora_choices(), studio.weights_choices()
        return (
            gr.Dropdown(choices=model_names, value=model if model in model_names else None),
            gr.Dropdown(choices=lora_names, value=lora if lora in lora_names else NONE_CHOICE),
            gr.Dropdown(choices=weight_names, value=weights if weights in weight_names else NONE_CHOICE),
        )

    def load_model(model):
        if not model:
            return "no model selected"
        try:
            return studio.load_model(model)
        except Exception as exc:
            raise _refusal(exc) from exc

    def on_kind(kind, frame_count):
        images = kind in (IMAGE_TO_VIDEO, LONG_VIDEO)
        long = kind == LONG_VIDEO
        most_frames = LONG_FRAMES_MAX if long else most_frames_one_pass
        return (
            gr.Group(visible=images),
            gr.Group(visible=images),
            gr.Group(visible=kind == VIDEO_TO_VIDEO),
            gr.Group(visible=long),
            gr.Slider(
                value=min(frame_count, most_frames),
                maximum=most_frames,
                visible=kind != TEXT_TO_IMAGE,
                label="Total frames" if long else "Frames",
            ),
            # Switching kind clears the inputs the new kind does not take (as the original does).
            *((gr.Image(),) * 2 if images else (None, None)),
            gr.Video() if kind == VIDEO_TO_VIDEO else None,
        )

    def on_resize(resize):
        return gr.Radio(visible=resize), gr.Slider(visible=not resize), gr.Slider(visible=not resize)

    def generate(
        model: str,
        lora: str,
        lora_strength: float,
        prompt: str,
        negative_prompt: str,
        kind: str,
        sampler: str,
        steps: int,
        width: int,
        height: int,
        frames: int,
        guidance_scale: float,
        seed: int,
        resize_to_reference: bool,
        base_resolution: int,
        start_image: str | None = None,  # defaults of None make these optional for API clients
        end_image: str | None = None,
        video: str | None = None,
        denoise_strength: float = 0.70,
        partial_frames: int = 72,
        overlap_frames: int = 4,
        transformer_weights: str = NONE_CHOICE,
        progress=gr.Progress(),
    ):
        try:
            settings = GenerationSettings(
                model=model, kind=kind, prompt=prompt or "", negative_prompt=negative_prompt or "",
                sampler=sampler, steps=int(steps), width=int(width), height=int(height), frames=int(frames),
                guidance_scale=float(guidance_scale), seed=-1 if seed is None else int(seed),  # empty = random
                lora=lora or NONE_CHOICE, lora_strength=float(lora_strength), denoise_strength=float(denoise_strength),
                partial_frames=int(partial_frames), overlap_frames=int(overlap_frames),
                resize_to_reference=bool(resize_to_reference), base_resolution=int(base_resolution),
                start_image=start_image, end_image=end_image, video=video,
                transformer_weights=transformer_weights or NONE_CHOICE,
            )
            progress(0, desc="Waiting for the model")
            result = studio.generate(settings, on_step=lambda done, total: progress((done, total), desc="Sampling"))
        except Exception as exc:
            raise _refusal(exc) from exc
        path = str(result.path)
        status = f"Saved {result.path.name} and {result.settings_path.name} in {result.path.parent}"
        # Plain values, so API clients get file paths; the page then shows the one that holds the result.
        return (None if result.is_image else path), (path if result.is_image else None), result.settings, status

    def show_result(settings):
        is_image = bool(settings) and settings.get("frames") == 1
        return gr.Video(visible=not is_image), gr.Image(visible=is_image)

    with gr.Blocks(title="EasyAnimate V4", analytics_enabled=False) as demo:
        gr.Markdown("# EasyAnimate V4\nText, image and video to video. One generation runs at a time.")
        with gr.Row():
            model = gr.Dropdown(
                models, value=preselected, label="Model folder", interactive=not hosted,
                info="the one model this server serves" if hosted else f"folders under {studio.models_dir}",
                allow_custom_value=True, scale=3,
            )
            lora = gr.Dropdown(
                studio.lora_choices(), value=NONE_CHOICE, label="LoRA", info=f"files under {studio.lora_dir}",
                allow_custom_value=True, scale=3, visible=not hosted,
            )
            lora_strength = gr.Slider(0.0, 2.0, value=0.55, step=0.05, label="LoRA strength", scale=2,
                                      visible=not hosted)
            refresh_button = gr.Button("Refresh lists", scale=1, visible=not hosted)
        with gr.Row(visible=not hosted):
            transformer_weights = gr.Dropdown(
                studio.weights_choices(), value=NONE_CHOICE, label="Transformer weights",
                info=f"fine-tuned weights (.safetensors) under {studio.weights_dir} in place of the model's own",
                allow_custom_value=True,
            )
        model_status = gr.Markdown(
            f"Serving {hosted.model}: up to {hosted.max_frames} frames of at most {hosted.max_pixels} pixels, "
            f"{hosted.max_steps} sampling steps." if hosted else ""
        )
        prompt = gr.Textbox(DEFAULT_PROMPT, lines=2, label="Prompt", elem_id="prompt")
        negative_prompt = gr.Textbox(DEFAULT_NEGATIVE_PROMPT, lines=2, label="Negative prompt")
        kind = gr.Radio(kinds, value=TEXT_TO_VIDEO, label="Generation kind")
        with gr.Group(visible=False) as image_inputs:
            with gr.Row():
                start_image = gr.Image(label="Start image", type="filepath", sources=["upload"])
                end_image = gr.Image(label="End image (optional)", type="filepath", sources=["upload"])
        with gr.Group(visible=False) as video_inputs:
            with gr.Row():
                video = gr.Video(label="Input video", sources=["upload"])
                denoise_strength = gr.Slider(
                    *STRENGTH_RANGE, value=0.70, step=0.01, label="Denoise strength",
                    info="how much of the input video is regenerated",
                )
        with gr.Group(visible=False) as long_inputs:
            with gr.Row():
                partial_frames = gr.Slider(*FRAMES_RANGE, value=72, step=8, label="Partial length (frames per pass)")
                overlap_frames = gr.Slider(*OVERLAP_RANGE, value=4, step=1, label="Overlap (frames)")
        with gr.Row():
            sampler = gr.Dropdown(list(SAMPLERS), value="Euler", label="Sampler")
            steps = gr.Slider(STEPS_RANGE[0], most_steps, value=start["steps"], step=1, label="Sampling steps",
                              elem_id="steps")
            guidance_scale = gr.Slider(*GUIDANCE_RANGE, value=7.0, step=0.1, label="Guidance (CFG) scale")
        with gr.Row():
            resize_to_reference = gr.Checkbox(False, label="Resize to the reference image/video")
            base_resolution = gr.Radio(list(BASE_RESOLUTIONS), value=512, label="Base resolution", visible=False)
            width = gr.Slider(*SIZE_RANGE, value=start["width"], step=16, label="Width", elem_id="width")
            height = gr.Slider(*SIZE_RANGE, value=start["height"], step=16, label="Height", elem_id="height")
        with gr.Row():
            frames = gr.Slider(FRAMES_RANGE[0], most_frames_one_pass, value=start["frames"], step=8, label="Frames",
                               elem_id="frames")
            seed = gr.Number(43, precision=0, label="Seed (-1 = random)")
            dice = gr.Button("Random seed", scale=0)
        with gr.Group(visible=False) as template_inputs:
            gr.Examples(
                [[str(e.image_path), e.prompt, e.width, e.height, DEMO_FRAMES, DEMO_STEPS] for e in IMAGE_TEMPLATES],
                [start_image, prompt, width, height, frames, steps],
                label="Template start images for the demo model (fill the image, prompt and size)",
                elem_id="image-templates",
            )
        gr.Examples(
            [[e.prompt, e.width, e.height, DEMO_FRAMES, DEMO_STEPS] for e in TEXT_EXAMPLES],
            [prompt, width, height, frames, steps],
            label="Prompts for the demo model (English or Chinese; fill the prompt and size)",
            elem_id="prompt-examples",
        )
        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            result_video = gr.Video(label="Result", elem_id="result-video", interactive=False)
            result_image = gr.Image(label="Result", visible=False, interactive=False, type="filepath")
        with gr.Row():
            settings_used = gr.JSON(label="Settings used")
            status = gr.Textbox(label="Status", interactive=False)

        pickers = [model, lora, transformer_weights]
        refresh_button.click(refresh, pickers, pickers, api_name="refresh", queue=False)
        model.change(
            load_model, model, model_status, api_name="load_model", concurrency_limit=1, concurrency_id=MODEL_SLOT
        )
        kind.change(
            on_kind, [kind, frames],
            [image_inputs, template_inputs, video_inputs, long_inputs, frames, start_image, end_image, video],
            api_visibility="private", queue=False,
        )
        resize_to_reference.change(
            on_resize, resize_to_reference, [base_resolution, width, height], api_visibility="private", queue=False
        )
        dice.click(lambda: random.randint(1, SEED_MAX), None, seed, api_visibility="private", queue=False)
        generate_button.click(
            generate,
            [
                model, lora, lora_strength, prompt, negative_prompt, kind, sampler, steps, width, height, frames,
                guidance_scale, seed, resize_to_reference, base_resolution, start_image, end_image, video,
                denoise_strength, partial_frames, overlap_frames, transformer_weights,
            ],
            [result_video, result_image, settings_used, status],
            api_name="generate",
            show_progress_on=[result_video, result_image],
            concurrency_limit=1,
            concurrency_id=MODEL_SLOT,
        ).success(show_result, settings_used, [result_video, result_image], api_visibility="private", queue=False)
        demo.load(refresh, pickers, pickers, api_visibility="private", queue=False)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="EasyAnimate V4 web UI and API (Gradio).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--models-dir", default="models", help="folder whose sub-folders are the models offered")
    parser.add_argument("--lora-dir", default=None,
                        help="folder of LoRA .safetensors files (default <models-dir>/lora)")
    parser.add_argument("--weights-dir", default=None,
                        help="folder of fine-tuned transformer weights (.safetensors) offered in place of a model's "
                             "own (default <models-dir>/transformer_weights)")
    parser.add_argument("--output-dir", default="samples", help="every result and its settings JSON go here")
    hosted = parser.add_argument_group(
        "hosted mode", "--ui-mode hosted (the original's 'modelscope' mode) is for a page open to the public: one "
        "model, loaded at start, no LoRA or other weights, no long videos, small jobs; API requests meet the same "
        "limits")
    hosted.add_argument("--ui-mode", choices=("normal", "hosted"), default="normal", help="page mode")
    hosted.add_argument("--model", default=DEFAULT_MODEL_NAME,
                        help="hosted mode: the model folder (under --models-dir) to serve")
    hosted.add_argument("--max-steps", type=int, default=30, help="hosted mode: most sampling steps")
    hosted.add_argument("--max-frames", type=int, default=48, help="hosted mode: most frames (a multiple of 8)")
    hosted.add_argument("--max-pixels", type=int, default=672 * 384,
                        help="hosted mode: most pixels per frame (default 672 x 384)")
    parser.add_argument("--memory-mode", choices=MEMORY_MODES, default="model_cpu_offload",
                        help="on a GPU: move each model in when it runs (default), stream layer by layer "
                        "(sequential_cpu_offload, least memory), or keep everything on the GPU")
    parser.add_argument("--queue-size", type=int, default=16, help="requests that may wait behind the running one")
    parser.add_argument("--max-upload-mb", type=int, default=200, help="largest accepted upload, in MiB")
    return parser.parse_args(argv)


def launch(studio: Studio, *, host: str, port: int, share: bool = False, queue_size: int = 16,
           prevent_thread_lock: bool = False):
    """Queue and serve the app, with the original's HTTP routes beside it; returns the launched ``gr.Blocks``."""
    demo = build_app(studio)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(studio.output.root)],
        max_file_size=studio.limits.max_bytes,
        prevent_thread_lock=True,
        footer_links=["api"],
    )
    add_original_routes(demo.server_app, studio)
    if not prevent_thread_lock:
        demo.block_thread()
    return demo


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    lora_dir = Path(args.lora_dir) if args.lora_dir else Path(args.models_dir) / "lora"
    hosted = None
    if args.ui_mode == "hosted":
        try:
            hosted = HostedLimits(args.model, args.max_steps, args.max_frames, args.max_pixels)
        except ValueError as exc:
            raise SystemExit(f"app.py: error: {exc}") from exc
    try:
        studio = Studio(
            args.models_dir, lora_dir, args.output_dir, load_pipeline=easyanimate_loader(args.memory_mode),
            limits=UploadLimits(max_bytes=args.max_upload_mb * 2**20), weights_dir=args.weights_dir, hosted=hosted,
        )
    except RefusedError as exc:  # hosted mode's model is not there
        raise SystemExit(f"app.py: error: --model: {exc}") from exc
    if hosted:
        logger.info(studio.load_model(hosted.model))  # before serving, so no visitor waits for it
    elif not studio.model_choices():
        logger.warning("no model folders under %s yet: add one and press 'Refresh lists'", args.models_dir)
    launch(studio, host=args.host, port=args.port, share=args.share, queue_size=args.queue_size)
