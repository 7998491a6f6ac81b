"""Recommender models: the :class:`Recommender` interface, a registry and the built-in models.

``ModelConfig`` is the discriminated union (on ``name``) of every model config; configs validate into
the right class and :func:`build_model` instantiates it::

    from fishertune.recsys.models import build_model
    model = build_model({"name": "multvae", "latent_dim": 100}, n_users, n_items, seed=0)

A new model: a module with a ``StrictModel`` config (``name: Literal["mymodel"] = "mymodel"``) and a
``@register_model("mymodel")`` Recommender subclass, imported here and added to ``ModelConfig``.
"""

from typing import Annotated, Union

from pydantic import Field

from fishertune.recsys.models.base import (Recommender, build_model, get_model_class, register_model,
                                           registered_models)
from fishertune.recsys.models.bert4rec import BERT4Rec, BERT4RecConfig
from fishertune.recsys.models.ease import EASE, EASEConfig
from fishertune.recsys.models.popularity import Popularity, PopularityConfig
from fishertune.recsys.models.sasrec import SASRec, SASRecConfig
from fishertune.recsys.models.vae import MultDAE, MultDAEConfig, MultVAE, MultVAEConfig

ModelConfig = Annotated[Union[PopularityConfig, EASEConfig, MultDAEConfig, MultVAEConfig, SASRecConfig,
                              BERT4RecConfig],
                        Field(discriminator="name")]

__all__ = ["Recommender", "ModelConfig", "build_model", "register_model", "get_model_class",
           "registered_models", "Popularity", "PopularityConfig", "EASE", "EASEConfig", "MultDAE",
           "MultDAEConfig", "MultVAE", "MultVAEConfig",
           "SASRec", "SASRecConfig", "BERT4Rec", "BERT4RecConfig"]
