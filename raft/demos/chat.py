"""Chat demo: the same message goes to the base model and the aligned one, their replies stream side by side,
and each reply is scored by the run's own rankers.

    raft demo chat --run runs/text-companion            # or a checkpoint folder, with --base for a bare one
"""

from __future__ import annotations

import queue
import threading

import gradio as gr
import torch
from transformers import TextStreamer

from raft.demos.common import DemoRun, open_run, serve
from raft.errors import RaftError
from raft.interface import Sample
from raft.rankers import score_samples

SIDES = ("base", "aligned")


class QueueStreamer(TextStreamer):
    """Puts each decoded piece of one side's reply on a queue shared by both sides, so one loop can show the
    two replies growing at once (TextIteratorStreamer would need a reader thread per side)."""

    def __init__(self, tokenizer, pieces: queue.Queue, side: str):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.pieces, self.side = pieces, side

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.pieces.put((self.side, text, stream_end))


class ChatModels:
    """The base and aligned policies of a run, its ranker, and multi-turn streaming generation."""

    def __init__(self, run: DemoRun, max_new_tokens: int, history_turns: int = 3):
        from raft.modalities.text.config import LoraConfig
        from raft.modalities.text.model import load_policy
        from raft.modalities.text.rankers import build_ranker

        config = run.config
        self.run, self.max_new_tokens, self.history_turns = run, max_new_tokens, history_turns
        self.template = config.data.prompt_template
        base = load_policy(config.model, LoraConfig(enabled=False), None, seed=config.seed)
        aligned = load_policy(config.model, config.finetune.lora, run.checkpoint, seed=config.seed) if run.checkpoint else base
        self.policies = {"base": base, "aligned": aligned}
        self.ranker = build_ranker(config.rankers, base.device)

    def input_ids(self, side: str, turns: list[dict], message: str) -> torch.Tensor:
        """The conversation so far (its last `history_turns` turns) and the new message, as the model reads it.
        User messages get the run's prompt template, as its prompts did in training."""
        policy = self.policies[side]
        if not policy.use_chat_template:  # a raw language model continues the message alone
            text = self.template.replace("{prompt}", message)
            return policy.tokenizer(text, return_tensors="pt")["input_ids"]
        messages = [{"role": "system", "content": policy.system_prompt}] if policy.system_prompt else []
        for turn in turns[-self.history_turns:] if self.history_turns else []:
            messages += [{"role": "user", "content": self.template.replace("{prompt}", turn["message"])},
                         {"role": "assistant", "content": turn[side]}]
        messages.append({"role": "user", "content": self.template.replace("{prompt}", message)})
        text = policy.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return policy.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def stream(self, turns: list[dict], message: str):
        """Yields {side: reply so far} as tokens arrive; both models generate at once, each in its own thread."""
        pieces: queue.Queue = queue.Queue()
        for side, policy in self.policies.items():
            ids = self.input_ids(side, turns, message).to(policy.device)
            streamer = QueueStreamer(policy.tokenizer, pieces, side)
            threading.Thread(target=self._generate, args=(policy, ids, streamer), daemon=True).start()
        replies, running = dict.fromkeys(SIDES, ""), set(SIDES)
        while running:
            side, text, ended = pieces.get()
            replies[side] += text
            if ended:
                running.discard(side)
            yield dict(replies)

    def _generate(self, policy, ids: torch.Tensor, streamer: QueueStreamer) -> None:
        g = self.run.config.generation
        sampling = dict(do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k) if g.temperature > 0 \
            else dict(do_sample=False)
        try:
            with torch.no_grad():
                policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=policy.tokenizer.pad_token_id,
                                      eos_token_id=sorted(policy.eos_ids), **sampling)
        except Exception as error:  # shown in the pane; the app keeps serving
            streamer.pieces.put((streamer.side, f" [generation failed: {error}]", True))

    def rewards(self, message: str, replies: dict[str, str]) -> dict[str, Sample]:
        """Both replies scored in one call, against the prompt as the run's rankers saw prompts."""
        prompt = self.template.replace("{prompt}", message)
        samples = {side: Sample(prompt_index=0, prompt=prompt, output=replies[side]) for side in SIDES}
        score_samples(self.ranker, list(samples.values()))
        return samples


def reward_line(turns: list[dict], side: str) -> str:
    """The last reply's reward (and its parts, when the run combines several rankers), and the conversation's mean."""
    scored = [t[f"{side}_reward"] for t in turns if t.get(f"{side}_reward") is not None]
    if not scored:
        return "reward: —"
    last = scored[-1]
    line = f"reward **{last['total']:.3f}**"
    if last["parts"]:
        line += " (" + " · ".join(f"{name} {value:.3f}" for name, value in last["parts"].items()) + ")"
    if len(scored) > 1:
        line += f" · conversation mean {sum(s['total'] for s in scored) / len(scored):.3f}"
    return line


def pane(turns: list[dict], side: str) -> list[dict]:
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": turn["message"]},
                     {"role": "assistant", "content": turn[side] or "…"}]
    return messages


def build_app(models: ChatModels, max_input_chars: int) -> gr.Blocks:
    with gr.Blocks(title="raft chat: base vs aligned", analytics_enabled=False) as app:
        gr.Markdown("## raft chat demo: base vs aligned\n" + models.run.summary())
        turns = gr.State([])
        with gr.Row():
            outputs = {}
            for side in SIDES:
                with gr.Column():
                    outputs[side] = gr.Chatbot(label=f"{side.capitalize()} model", elem_id=f"{side}-chat", height=420,
                                                 buttons=["copy", "copy_all"])
                    outputs[f"{side}_reward"] = gr.Markdown("reward: —", elem_id=f"{side}-reward")
        box = gr.Textbox(label="Message (sent to both models)", elem_id="message", submit_btn=True,
                         placeholder="I feel lonely tonight.", info=f"at most {max_input_chars} characters")
        status = gr.Markdown("", elem_id="status")
        clear = gr.Button("New conversation")
        views = [outputs["base"], outputs["aligned"], outputs["base_reward"], outputs["aligned_reward"]]

        def respond(message: str, history: list[dict]):
            message = (message or "").strip()
            if not message:
                yield *[gr.skip()] * 7,
                return
            if len(message) > max_input_chars:
                warning = (f"⚠️ Message too long: {len(message)} characters, the limit is {max_input_chars}. "
                           "Please shorten it.")
                gr.Warning(warning)
                yield *[gr.skip()] * 4, warning, gr.skip(), gr.skip()  # the message stays, to be shortened
                return
            turn = {"message": message, "base": "", "aligned": ""}
            for replies in models.stream(history, message):
                turn.update(replies)
                current = history + [turn]
                yield pane(current, "base"), pane(current, "aligned"), gr.skip(), gr.skip(), "", "", gr.skip()
            note = ""
            try:
                for side, sample in models.rewards(message, turn).items():
                    turn[f"{side}_reward"] = {"total": sample.reward, "parts": dict(sample.rewards)}
            except RaftError as error:  # a ranker failing must not take the app down
                note = f"⚠️ Reward unavailable: {error}"
            history = history + [turn]
            yield (pane(history, "base"), pane(history, "aligned"), reward_line(history, "base"),
                   reward_line(history, "aligned"), note, "", history)

        box.submit(respond, [box, turns], [*views, status, box, turns])
        reset = lambda: ([], [], "reward: —", "reward: —", "", [])  # noqa: E731
        # the button and each pane's own trash icon start a new conversation in both panes
        for event in (clear.click, outputs["base"].clear, outputs["aligned"].clear):
            event(reset, None, [*views, status, turns])
    return app


def launch(run_path: str, base: str | None = None, host: str = "127.0.0.1", port: int | None = None,
           max_input_chars: int = 500, max_new_tokens: int = 128, history_turns: int = 3, block: bool = True,
           trust_run_code: bool = False, auth: tuple[str, str] | None = None, max_queue: int = 8):
    models = ChatModels(open_run(run_path, "text", base, trust_run_code), max_new_tokens, history_turns)
    return serve(build_app(models, max_input_chars), host, port, block, auth, max_queue)  # one generation at a time
