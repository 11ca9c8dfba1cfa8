"""What a job is made of, checked: the job spec, its datasets and tokenizer, the errors a user
reads (one line each) and the one rule that keeps credentials out of them. The lowest layer: it
imports nothing from the others, and nothing of Ray or MLflow."""
