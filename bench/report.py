"""The results: goal rows (figure, goal, met or not) and detail tables, as text and as Markdown."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Goal:
    number: str
    metric: str
    goal: str
    figure: str = "not measured"
    met: bool | None = None     # None: not measured in this run (or a goal that is only reported)
    note: str = ""
    reported: bool = False      # a figure to report, with no threshold

    @property
    def verdict(self) -> str:
        if self.reported and self.figure != "not measured":
            return "reported"
        return {True: "met", False: "NOT MET", None: "n/a"}[self.met]


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    goals: dict[str, Goal] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)

    def goal(self, number: str, metric: str, goal: str, *, reported: bool = False) -> Goal:
        self.goals[number] = Goal(number, metric, goal, reported=reported)
        return self.goals[number]

    def set(self, number: str, figure: str, met: bool | None, note: str = "") -> None:
        g = self.goals[number]
        g.figure, g.met, g.note = figure, met, note

    def goal_table(self) -> Table:
        t = Table("Goals", ["#", "metric", "goal", "measured", "verdict", "note"])
        for g in self.goals.values():
            t.rows.append([g.number, g.metric, g.goal, g.figure, g.verdict, g.note])
        return t

    def unmet(self) -> list[Goal]:
        return [g for g in self.goals.values() if g.met is False]

    # -- rendering ----------------------------------------------------------------------------
    def text(self) -> str:
        out = []
        for t in [self.goal_table(), *self.tables]:
            out.append(_text_table(t))
        return "\n".join(out)

    def markdown(self, title: str, preface: list[str]) -> str:
        lines = [f"# {title}", "", *preface, ""]
        lines += ["## Machine and run", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {_md(v)} |" for k, v in self.facts.items()]
        lines.append("")
        for t in [self.goal_table(), *self.tables]:
            lines += [f"## {t.title}", "", "| " + " | ".join(t.headers) + " |",
                      "|" + "---|" * len(t.headers)]
            lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in t.rows]
            if t.notes:
                lines.append("")
                lines += [f"- {n}" for n in t.notes]
            lines.append("")
        return "\n".join(lines)


def _md(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def _text_table(t: Table) -> str:
    widths = [len(h) for h in t.headers]
    for row in t.rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [f"== {t.title}", fmt.format(*t.headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in t.rows]
    lines += [f"   * {n}" for n in t.notes]
    return "\n".join(lines) + "\n"
