"""Graders: score a model output against an item, as OpenAI defines them (string_check,
text_similarity, score_model, label_model, python, multi). Shared by evals and reinforcement
fine-tuning. See /work/notes/graders-api.md while it is being built."""
