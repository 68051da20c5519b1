"""Errors that mean "the user's input is wrong": the driver prints them and exits with code 2."""


class UserInputError(Exception):
    """Bad input from the user (config, storage location): reported without a traceback."""


class ConfigError(UserInputError):
    """A config file or override is invalid; the message names the file and the key path."""


class StorageError(UserInputError):
    """A storage URI cannot be reached, read or written; the message names the URI."""
