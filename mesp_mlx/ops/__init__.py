"""Forward/backward pairs, one module per layer kind, in the shape of llm.c's training file.

Every `*_backward` takes the upstream gradient first, then what the forward took (and what it saved), and returns
the gradients in the order of the forward's differentiable inputs. Each pair is tested against MLX autodiff.
"""
