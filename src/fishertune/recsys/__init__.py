"""The recommender lab: data, splits, metrics, evaluation, models and training."""
