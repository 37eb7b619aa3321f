"""steerplug demo: the same chat answered unsteered and steered, side by side, with the per-token
score of the steered SAE features before and after steering.

Runs offline on the default model (SmolLM2-135M-Instruct) and the artifacts in hub_artifacts/.
Another model / SAE / vector: command-line flags or environment variables

    python demo/app.py --model Qwen/Qwen2.5-0.5B-Instruct --sae ORG/sae-repo --vector ORG/vector-repo
    STEERPLUG_MODEL=... STEERPLUG_SAE=... STEERPLUG_VECTOR=... STEERPLUG_LAYER=12 python demo/app.py

The logic lives in steerplug.demo_utils; this file is only the UI.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
try:
    import steerplug  # noqa: F401
except ImportError:  # running from a checkout without installing: use the package next door
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradio as gr  # noqa: E402

from steerplug.batching import BatchEngine  # noqa: E402
from steerplug.demo_utils import (EXAMPLE_PROMPTS, FEATURE_COLUMNS, DemoSettings,  # noqa: E402
                                  chat_prompt_ids, compare_stream, feature_table, gate_log,
                                  load_steered, message_gate, score_figure, summary)
from steerplug.steering import POSITIONS  # noqa: E402

TITLE = "steerplug: SAE steering, live"
INTRO = """Each message is answered twice **in the same batch**: on the left by the plain model, on the
right steered. With the shipped configuration a prompt gate (a detector over SAE features of the
prompt) decides whether to steer at all; the line under the chat says, for every message, whether it
fired and with what score against its threshold. Where it fires, the hooks edit the residual stream
(`add`: fixed refusal directions added at several layers; `gradient`: steps that lower
`SAE.encode(h) · w`, where `w` weights the SAE features tied to harmful requests). The plot shows
`encode(h) · w` per generated token, before and after the edit at the SAE's layer."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=env("STEERPLUG_MODEL") or None,
                   help="Hub id or folder (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--sae", default=env("STEERPLUG_SAE", "default"), help="SAE folder or Hub repo")
    p.add_argument("--vector", default=env("STEERPLUG_VECTOR", "default"), help="vector folder or Hub repo")
    p.add_argument("--sae-subfolder", default=env("STEERPLUG_SAE_SUBFOLDER") or None)
    p.add_argument("--vector-subfolder", default=env("STEERPLUG_VECTOR_SUBFOLDER") or None)
    p.add_argument("--layer", type=int, default=int(env("STEERPLUG_LAYER")) if env("STEERPLUG_LAYER") else None)
    p.add_argument("--steps", type=int, default=int(env("STEERPLUG_STEPS")) if env("STEERPLUG_STEPS") else None,
                   help="default of the steps slider (default: the loaded steering configuration's)")
    p.add_argument("--strength", type=float,
                   default=float(env("STEERPLUG_STRENGTH")) if env("STEERPLUG_STRENGTH") else None,
                   help="default of the strength slider (default: the loaded steering configuration's)")
    p.add_argument("--max-new-tokens", type=int, default=int(env("STEERPLUG_MAX_NEW_TOKENS", "96")))
    p.add_argument("--max-batch", type=int, default=int(env("STEERPLUG_MAX_BATCH", "16")))
    p.add_argument("--max-prompt-tokens", type=int, default=int(env("STEERPLUG_MAX_PROMPT_TOKENS", "1024")),
                   help="longest conversation answered, in tokens (longer ones are refused before any work)")
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--queue-size", type=int, default=int(env("STEERPLUG_QUEUE_SIZE", "32")))
    p.add_argument("--concurrency", type=int, default=int(env("STEERPLUG_CONCURRENCY", "8")),
                   help="chats answered at once (they share the model's batches)")
    return p.parse_args(argv)


def build_demo(engine: BatchEngine, note: str | None = None, *, steps: int | None = None,
               strength: float | None = None, max_new_tokens: int = 96,
               max_prompt_tokens: int = 1024) -> gr.Blocks:
    """The demo; the sliders start at the steered model's configuration (for the default model, the
    shipped bundle's) unless ``steps`` / ``strength`` are given."""
    steered = engine.steered
    steps = steered.config.steps if steps is None else steps
    strength = steered.config.lr if strength is None else strength
    where = steered.hook_point.name if steered.can_steer else "nowhere (no SAE)"

    def respond(message: str, plain_hist: list, steered_hist: list, enabled: bool, n_steps: float,
                lr: float, positions: str, max_tokens: float, gates: list | None = None):
        gates = list(gates or [])  # [(message, gate line)], one per answered message
        message = (message or "").strip()
        keep = (gr.skip(), gr.skip(), gr.skip(), gr.skip())  # plot, table, gate state, gate log
        if not message:
            yield plain_hist, steered_hist, "", *keep, "Type a message first."
            return
        if len(message) > 8 * max_prompt_tokens:  # no tokenizer call on a huge message
            yield (plain_hist, steered_hist, message, *keep,
                   f"That message has {len(message):,} characters; this demo takes up to "
                   f"{max_prompt_tokens} tokens of conversation. Shorten it or clear the chat.")
            return
        settings = DemoSettings(enabled=bool(enabled), steps=int(n_steps), strength=float(lr),
                                positions=positions, max_new_tokens=int(max_tokens))
        plain_ids = chat_prompt_ids(engine, plain_hist, message)
        steered_ids = chat_prompt_ids(engine, steered_hist, message)
        longest = max(len(plain_ids), len(steered_ids))
        if longest > max_prompt_tokens:
            yield (plain_hist, steered_hist, message, *keep,
                   f"The conversation is {longest} tokens; this demo takes up to {max_prompt_tokens}. "
                   "Shorten the message or clear the chat.")
            return
        gate = message_gate(engine, steered_ids, settings).line()  # the steered column's prompt
        gates.append((message, gate))
        log = gate_log(gates)
        user = {"role": "user", "content": message}
        plain_hist = plain_hist + [user, {"role": "assistant", "content": ""}]
        steered_hist = steered_hist + [user, {"role": "assistant", "content": ""}]
        snaps = compare_stream(engine, plain_ids, settings, steered_prompt_ids=steered_ids)
        snap = None
        for i, snap in enumerate(snaps):
            plain_hist[-1]["content"] = snap.plain.text
            steered_hist[-1]["content"] = snap.steered.text
            if i % 4 == 0 or snap.done:
                yield (plain_hist, steered_hist, "", gr.skip(), gr.skip(), gates, log,
                       f"{gate}\n\n{summary(snap)}")
        if snap is None:
            return
        errors = [e for e in (snap.plain.error, snap.steered.error) if e]
        status = (f"{gate}\n\n{summary(snap)} · done"
                  + (f"\n\n**Error:** {'; '.join(errors)}" if errors else ""))
        yield (plain_hist, steered_hist, "", score_figure(snap),
               feature_table(snap, steered.vector), gates, log, status)

    with gr.Blocks(title=TITLE) as demo:
        how = (f"method `{steered.config.method}`, "
               + (f"gated by `{steered.gate!r}`" if steered.gate is not None and steered.config.use_gate
                  else "no gate"))
        gr.Markdown(f"# {TITLE}\n{INTRO}\n\nSteering at `{where}` with `{steered.vector!r}`; {how}.")
        if note:
            gr.Markdown(note, elem_id="note")
        with gr.Row():
            plain_chat = gr.Chatbot(label="Unsteered", elem_id="plain-chat", height=380)
            steered_chat = gr.Chatbot(label="Steered", elem_id="steered-chat", height=380)
        with gr.Row():
            msg = gr.Textbox(placeholder="Ask something…", show_label=False, scale=5, elem_id="prompt")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            clear = gr.Button("Clear", scale=1, elem_id="clear")
        with gr.Row():
            enabled = gr.Checkbox(value=steered.can_steer, label="Steering on", elem_id="steer-on",
                                  interactive=steered.can_steer)
            n_steps = gr.Slider(0, 20, value=steps, step=1, label="Steps per token", elem_id="steps")
            lr = gr.Slider(0.0, 2.0, value=strength, step=0.05, label="Strength (lr)", elem_id="strength")
            positions = gr.Radio(list(POSITIONS), value=steered.config.positions, label="Positions", elem_id="positions")
            max_tokens = gr.Slider(8, 512, value=max_new_tokens, step=8, label="Max new tokens",
                                   elem_id="max-tokens")
        status = gr.Markdown(elem_id="status")
        gate_state = gr.State([])
        gate_md = gr.Markdown(elem_id="gate-log")
        with gr.Row():
            plot = gr.Plot(label="encode(h) · w per generated token", show_label=False, elem_id="score-plot")
            table = gr.Dataframe(headers=FEATURE_COLUMNS, label="Top active SAE features (steered answer)",
                                 elem_id="features", interactive=False)
        gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[msg], label="Example prompts")

        inputs = [msg, plain_chat, steered_chat, enabled, n_steps, lr, positions, max_tokens, gate_state]
        outputs = [plain_chat, steered_chat, msg, plot, table, gate_state, gate_md, status]
        send.click(respond, inputs, outputs)
        msg.submit(respond, inputs, outputs)
        clear.click(lambda: ([], [], "", None, None, [], "", ""), None, outputs, queue=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    steered, note = load_steered(args.model, args.sae, args.vector, layer=args.layer,
                                 sae_subfolder=args.sae_subfolder, vector_subfolder=args.vector_subfolder)
    engine = BatchEngine(steered, max_batch=args.max_batch).start()
    demo = build_demo(engine, note, steps=args.steps, strength=args.strength,
                      max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, show_error=True,
                theme=gr.themes.Base(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                     font_mono=["ui-monospace", "monospace"]))


if __name__ == "__main__":
    main()
