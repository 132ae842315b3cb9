"""rssbl_jax: LoRA whose rank space is modulated by operating parameters (RSSBilinearLoRA), for JAX/Flax."""

from rssbl_jax.core import ParameterCount as ParameterCount
from rssbl_jax.core import count_parameters as count_parameters
from rssbl_jax.core import lead_axes as lead_axes
from rssbl_jax.core import merge_dense as merge_dense
from rssbl_jax.core import modulate as modulate
from rssbl_jax.core import rss_dense as rss_dense
from rssbl_jax.core import rss_update as rss_update
from rssbl_jax.linen import RSSBilinearLoRADense as RSSBilinearLoRADense
from rssbl_jax.merge import merge as merge
from rssbl_jax.partition import combine as combine
from rssbl_jax.partition import freeze_base as freeze_base
from rssbl_jax.partition import partition as partition

__version__ = "0.1.0"
