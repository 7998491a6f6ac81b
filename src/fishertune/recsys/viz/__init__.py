"""Pictures of trained recommenders (``fishertune viz RUN_DIR VIEW``).

- sequential models (SASRec, BERT4Rec): :func:`user_attention` / :func:`plot_attention` (every layer and
  head for one user), :func:`attention_summary` / :func:`plot_attention_summary` (layer- and position-wise
  statistics over many users);
- Mult-VAE: :func:`latent_view` / :func:`plot_latent` (latent means in 2-D: PCA or t-SNE),
  :func:`reconstruction` / :func:`plot_reconstruction` (input vs reconstruction of one user),
  :func:`plot_curves` (total, reconstruction, KL, annealing schedule; other models: every logged term);
- item vectors: :func:`similar_items` / :func:`plot_similar_items` (cosine similarity of decoder rows or
  item embeddings, looked up by original item ID, MovieLens titles via :func:`item_titles`).

Figures are drawn on matplotlib's Agg backend and written atomically.
"""

from fishertune.recsys.viz._common import item_titles, lookup_id
from fishertune.recsys.viz.attention import (UserAttention, attention_summary, attention_weights,
                                             plot_attention, plot_attention_summary, user_attention)
from fishertune.recsys.viz.curves import plot_curves, read_history
from fishertune.recsys.viz.vae import (LatentView, Reconstruction, item_vectors, latent_means, latent_view,
                                       plot_latent, plot_reconstruction, plot_similar_items, project_2d,
                                       reconstruction, similar_items)

__all__ = ["UserAttention", "attention_summary", "attention_weights", "plot_attention", "plot_attention_summary",
           "user_attention", "plot_curves", "read_history", "LatentView", "Reconstruction", "item_vectors",
           "latent_means", "latent_view", "plot_latent", "plot_reconstruction", "plot_similar_items",
           "project_2d", "reconstruction", "similar_items", "item_titles", "lookup_id"]
