"""Annotation: prompts, engines (hf, vllm, openai) and output validation for the MegaPairs steps."""
