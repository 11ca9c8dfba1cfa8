"""One job from start to end: its set-up (data, base model, shared objects), tasks run
durably on the engine, results into MLflow. Used by `run`, and by `tune` for its set-up."""
