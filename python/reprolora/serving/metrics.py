"""The metrics `reprolora serve` exposes at /metrics, in Prometheus' text format."""

from __future__ import annotations

import threading


class Metrics:
    """Request counts by route and status and latency sums, in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, tuple[float, int]] = {}
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.waiting = 0  # requests submitted and not yet decoding
        self.decode_steps = 0
        self.decode_rows = 0  # requests decoded, summed over the steps (rows computed: SLOTS per step)
        self.guessed_tokens = 0  # idle rows that carried a guessed token (generate's module docstring)
        self.accepted_guesses = 0  # those that were right: tokens beyond one per request and step

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            total, count = self.latency.get(route, (0.0, 0))
            self.latency[route] = (total + seconds, count + 1)

    def add_tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def queue(self, delta: int) -> None:
        with self._lock:
            self.waiting += delta

    def decoded(self, rows: int, guessed: int, accepted: int) -> None:
        with self._lock:
            self.decode_steps += 1
            self.decode_rows += rows
            self.guessed_tokens += guessed
            self.accepted_guesses += accepted

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP reprolora_requests_total HTTP requests by route and status code.",
                "# TYPE reprolora_requests_total counter",
            ]
            lines += [
                f'reprolora_requests_total{{route="{route}",status="{status}"}} {n}'
                for (route, status), n in sorted(self.requests.items())
            ]
            lines += [
                "# HELP reprolora_request_duration_seconds Time from request read to response sent.",
                "# TYPE reprolora_request_duration_seconds summary",
            ]
            for route, (total, count) in sorted(self.latency.items()):
                lines.append(f'reprolora_request_duration_seconds_sum{{route="{route}"}} {total:.6f}')
                lines.append(f'reprolora_request_duration_seconds_count{{route="{route}"}} {count}')
            lines += [
                "# HELP reprolora_prompt_tokens_total Prompt tokens of answered completions.",
                "# TYPE reprolora_prompt_tokens_total counter",
                f"reprolora_prompt_tokens_total {self.prompt_tokens}",
                "# HELP reprolora_completion_tokens_total Generated tokens of answered completions.",
                "# TYPE reprolora_completion_tokens_total counter",
                f"reprolora_completion_tokens_total {self.completion_tokens}",
                "# HELP reprolora_queued_requests Completions waiting for the model.",
                "# TYPE reprolora_queued_requests gauge",
                f"reprolora_queued_requests {self.waiting}",
                "# HELP reprolora_decode_steps_total Decoding steps run (each a fixed number of rows).",
                "# TYPE reprolora_decode_steps_total counter",
                f"reprolora_decode_steps_total {self.decode_steps}",
                "# HELP reprolora_decode_rows_total Requests decoded in those steps, summed over the steps.",
                "# TYPE reprolora_decode_rows_total counter",
                f"reprolora_decode_rows_total {self.decode_rows}",
                "# HELP reprolora_guessed_tokens_total Idle rows of those steps that carried a guessed token.",
                "# TYPE reprolora_guessed_tokens_total counter",
                f"reprolora_guessed_tokens_total {self.guessed_tokens}",
                "# HELP reprolora_accepted_guesses_total Guessed tokens that were right (decoded beyond one a step).",
                "# TYPE reprolora_accepted_guesses_total counter",
                f"reprolora_accepted_guesses_total {self.accepted_guesses}",
            ]
        return "\n".join(lines) + "\n"
