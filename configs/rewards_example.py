"""An example callable reward: prefers responses of about 25 words (in [0, 1])."""


def brevity(prompts, responses):
    return [max(0.0, 1 - abs(len(r.split()) - 25) / 25) for r in responses]
