"""The one exception type the CLI turns into a one-line message and exit code 2."""


class InputError(Exception):
    """Bad input from the user (file, model, option): the message is shown as one line."""


class SettingError(ValueError):
    """A configuration record's field outside its range. `setting` names the field and `rule` what it must
    be, so that a command line can say the same under its own flag's name."""

    def __init__(self, setting: str, rule: str, value: object, text: str | None = None) -> None:
        super().__init__(text or f"{setting} {rule}, not {value!r}")  # text: where the rule reads better whole
        self.setting, self.rule, self.value = setting, rule, value
