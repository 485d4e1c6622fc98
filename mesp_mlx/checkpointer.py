"""What a run leaves on disk to be used and to be resumed: the adapter (latest and numbered, mlx-lm's files) and
adapter_path/resume.safetensors, each replaced atomically; only the first process of a group writes.

The resume file holds the LoRA parameters, the optimizer state (moments, step counter), the number of batches
consumed (the data order follows from seed and epoch, so this is the data position), the engine's own state (MeZO's
seed counter, the only random state a run has) and the settings the numbers depend on. A resume with other such
settings is refused, naming each; the learning rate may change (a run that hit a NaN continues lower). In a group the
first process reads the file and sends it to the others (their disks need not hold it).
"""
import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import ConfigError, SourceError
from .io.adapters import RESUME_FILE, load_resume, save_adapter, save_resume
from .lora import from_flat, to_flat

# settings a checkpoint's numbers depend on: resuming with other values would not continue the same run
RESUME_KEYS = ("model", "data", "method", "rank", "scale", "keys", "num_layers", "batch_size", "max_seq_length",
               "mask_prompt", "optimizer", "lr_schedule", "seed", "grad_accumulation_steps", "mezo_eps", "dtype",
               "warmup", "optimizer_config", "hf_dataset", "skip_bad_rows", "lora_dropout",
               "pack", "loss", "beta", "dpo_cpo_loss_type", "reference_adapter_path", "rpo_alpha",
               "desirable_weight", "undesirable_weight", "group_size", "max_completion_length", "temperature",
               "top_p", "grpo_loss_type", "epsilon", "epsilon_high", "reward_functions", "format_pattern")


class Checkpointer:
    def __init__(self, out, config, group):
        self.out, self.config, self.group = out, config, group
        self.path = out / RESUME_FILE

    def settings(self):
        return {k: getattr(self.config, k) for k in RESUME_KEYS}

    def save(self, params, lora_cfg, model_path, opt_state, step, position, engine_state, numbered):
        if self.group.rank != 0:
            return
        save_adapter(self.out, params, lora_cfg, model_path, step if numbered else None)
        state = {"step": step, "position": position, "engine": engine_state, "config": self.settings()}
        save_resume(self.out, params, opt_state, state)

    def load(self, params, opt_state, engine_state):
        """-> (params, optimizer state, state) from the checkpoint, or None without one. params, opt_state and
        engine_state: the run's own, as the shapes and keys to expect (what the other processes of a group send)."""
        got, error = None, None
        if self.group.rank == 0:
            try:
                got = self._read(params)
            except Exception as e:  # any failure is announced to the group before it is raised, or they would hang
                error = e
        if self.group.size == 1:
            if error:
                raise error
            return got
        # every process learns whether there is a checkpoint, or an error, before any sends
        flag = 2 if error else (1 if got else 0)
        flag = int(self.group.sum(mx.array(flag if self.group.rank == 0 else 0)).item())
        if flag == 2:
            raise error or ConfigError(f"the first process could not resume from {self.path}")
        if flag == 0:
            return None
        if self.group.rank != 0:
            got = (params, dict(opt_state), {"step": 0, "position": 0, "engine": dict(engine_state)})
        return self._broadcast(*got, sorted(engine_state))

    def _read(self, params):
        got = load_resume(self.out)
        if got is None:
            return None
        ckpt_params, opt_state, state = got
        if "engine" not in state:  # written before engines kept their own state: MeZO's counter was at the top
            state["engine"] = {"mezo_calls": state.get("mezo_calls", 0)}
            got = (ckpt_params, opt_state, state)
        now = self.settings()
        changed = [f"{k} {v!r} (now {now[k]!r})" for k, v in state["config"].items() if now.get(k) != v]
        if changed:
            raise ConfigError(f"{self.path} was written by a run with other settings: {'; '.join(changed)}")
        shapes = lambda p: {k: tuple(v.shape) for k, v in to_flat(p).items()}
        if shapes(ckpt_params) != shapes(params):
            raise ConfigError(f"{self.path}: its LoRA tensors do not fit this model")
        return got

    def _broadcast(self, params, opt_state, state, engine_keys):
        send = self.group.send_from_first
        flat = to_flat(params)
        params = from_flat({k: send(flat[k]) for k in sorted(flat)})  # the same order in every process
        def send_exact(x):  # integers (the step count) travel as int64; floats as they are
            return send(x.astype(mx.int64)).astype(x.dtype) if mx.issubdtype(x.dtype, mx.integer) else send(x)

        opt_state = {k: ({s: send(opt_state[k][s]) for s in sorted(opt_state[k])} if isinstance(opt_state[k], dict)
                         else send_exact(opt_state[k])) for k in sorted(opt_state)}
        # evaluated here, each send in the same order in every process: left lazy, the sends would run inside the
        # step's graphs, where the order of collectives is not the same in every process (a deadlock)
        for _, x in tree_flatten((params, opt_state)):
            mx.eval(x)
        nums = send(mx.array([state["step"], state["position"]] + [state["engine"].get(k, 0) for k in engine_keys]))
        nums = [int(x) for x in nums.tolist()]
        return params, opt_state, {"step": nums[0], "position": nums[1], "engine": dict(zip(engine_keys, nums[2:]))}
