"""rssbl_jax: LoRA whose rank space is modulated by operating parameters (RSSBilinearLoRA), for JAX/Flax."""

from rssbl_jax import nnx as nnx
from rssbl_jax.checkpoint import LoadedAdapters as LoadedAdapters
from rssbl_jax.checkpoint import load_adapter_config as load_adapter_config
from rssbl_jax.checkpoint import load_adapters as load_adapters
from rssbl_jax.checkpoint import save_adapters as save_adapters
from rssbl_jax.config import GATES as GATES
from rssbl_jax.config import AdapterConfig as AdapterConfig
from rssbl_jax.config import LayerConfig as LayerConfig
from rssbl_jax.core import adapter_update as adapter_update
from rssbl_jax.core import fold as fold
from rssbl_jax.core import gate_and_shift as gate_and_shift
from rssbl_jax.core import lead_axes as lead_axes
from rssbl_jax.core import merge_dense as merge_dense
from rssbl_jax.core import merge_kernel as merge_kernel
from rssbl_jax.core import modulate as modulate
from rssbl_jax.core import rss_dense as rss_dense
from rssbl_jax.core import rss_update as rss_update
from rssbl_jax.inject import adaptable_paths as adaptable_paths
from rssbl_jax.inject import inject as inject
from rssbl_jax.inject import load_base as load_base
from rssbl_jax.linen import RSSBilinearLoRADense as RSSBilinearLoRADense
from rssbl_jax.merge import merge as merge
from rssbl_jax.partition import ParameterCount as ParameterCount
from rssbl_jax.partition import adapter_layers as adapter_layers
from rssbl_jax.partition import combine as combine
from rssbl_jax.partition import count_parameters as count_parameters
from rssbl_jax.partition import freeze_base as freeze_base
from rssbl_jax.partition import partition as partition
from rssbl_jax.partition import trainable_mask as trainable_mask
from rssbl_jax.sharding import adapter_partition_specs as adapter_partition_specs
from rssbl_jax.sharding import batch_spec as batch_spec
from rssbl_jax.sharding import local_batch_slice as local_batch_slice
from rssbl_jax.sharding import named_shardings as named_shardings
from rssbl_jax.sharding import operating_params_spec as operating_params_spec
from rssbl_jax.sharding import shard_batch as shard_batch
from rssbl_jax.sharding import shard_params as shard_params
from rssbl_jax.sharding import validate_specs as validate_specs
from rssbl_jax.training import NonFiniteError as NonFiniteError
from rssbl_jax.training import TrainState as TrainState
from rssbl_jax.training import init_train_state as init_train_state
from rssbl_jax.training import make_train_step as make_train_step
from rssbl_jax.training import restore_latest as restore_latest
from rssbl_jax.training import state_partition_specs as state_partition_specs
from rssbl_jax.training import train as train

__version__ = "0.2.0"
