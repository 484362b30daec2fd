"""`xtune eval`: multiple-choice benchmarks and generation tasks, on one model or a base and its tuned model.

    tasks.py (a benchmark's files -> Question) -> prompts.py (zero/few-shot text) -> score.py (log-likelihood of
    each option, or the letter a model writes) -> report.py (accuracy per subject, JSONL, table, chart)
    generation.py: prompts and references -> replies -> exact match, ROUGE-L, BLEU, a user's scorer
    run.py: one function per command, the model loaded once per side of a comparison, shared over ranks
"""
