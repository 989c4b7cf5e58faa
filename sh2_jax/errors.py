"""The one base class of errors caused by user input; the CLI prints them as one line."""


class UserError(Exception):
  """Bad input: the message is one line that says what is wrong and how to fix it."""


USER_ERRORS = (UserError,)
