"""The template sandbox: quoting, strictness, expressions, and what a template reads."""

import pytest

from maintenancebot.errors import TemplateError
from maintenancebot.templating import Registered, Templates, check_syntax, referenced_names


def test_every_value_is_shell_quoted_in_commands() -> None:
    rendered = Templates().render_shell("rm -f {{ path }}", {"path": "/tmp/a b; rm -rf /"})
    assert rendered == "rm -f '/tmp/a b; rm -rf /'"


def test_raw_filter_opts_out_of_quoting_for_one_value() -> None:
    rendered = Templates().render_shell("echo {{ a | raw }} {{ b }}", {"a": "$HOME", "b": "$HOME"})
    assert rendered == "echo $HOME '$HOME'"


def test_action_arguments_are_rendered_without_quoting() -> None:
    args = {"paths": ["{{ root }}/var/log/*.gz"], "older_than": "{{ days }}d", "n": 3}
    rendered = Templates().render_value(args, {"root": "/srv x", "days": 30})
    assert rendered == {"paths": ["/srv x/var/log/*.gz"], "older_than": "30d", "n": 3}


def test_undefined_variable_is_an_error_not_an_empty_string() -> None:
    with pytest.raises(TemplateError, match="'nope' is undefined"):
        Templates().render_shell("rm -rf /{{ nope }}", {})


def test_sandbox_refuses_python_internals() -> None:
    with pytest.raises(TemplateError):
        Templates().render_shell("{{ ''.__class__.__mro__ }}", {})


@pytest.mark.parametrize("source", [
    "{{ range(10**9) | list | length }}",  # the sandbox's own limit: OverflowError
    "{{ 1 / 0 }}", "{{ 2.0 ** 10000 }}", "{{ 'a' + 1 }}", "{{ {}.pop('x') }}", "{{ [].pop() }}",
])
def test_an_expression_that_raises_is_the_runbook_s_template_error(source: str) -> None:
    with pytest.raises(TemplateError, match="template error: [A-Za-z]+Error"):
        Templates().render_shell(source, {"items": [1]})


def test_when_expressions_read_registered_results() -> None:
    templates = Templates()
    context = {"disk": Registered(stdout="91"), "limit": 80}
    assert templates.evaluate("disk.stdout | int > limit", context) is True
    assert templates.evaluate("disk.rc is none", context) is True


def test_syntax_errors_are_reported_without_rendering() -> None:
    assert check_syntax("echo {{ a ") is not None
    assert check_syntax("a ==", expression=True) is not None
    assert check_syntax("echo {{ a }}") is None
    # Unknown filters and tests, which Jinja's parser lets through to the compiler:
    assert "No filter named 'nosuch'" in (check_syntax("echo {{ a | nosuch }}") or "")
    assert "No test named 'nosuch'" in (check_syntax("{% if a is nosuch %}{% endif %}") or "")
    assert "No filter named 'nosuch'" in (check_syntax("{% filter nosuch %}{% endfilter %}") or "")
    assert check_syntax("{{ a | default(1) | quote }} {{ b | raw }}{% if b is defined %}{% endif %}") \
        is None


def test_referenced_names_lists_top_level_variables() -> None:
    names = referenced_names("x.stdout | int > limit and host.name == 'a'", expression=True)
    assert names == {"x", "limit", "host"}


def test_an_argument_that_is_one_expression_keeps_its_type() -> None:
    templates = Templates()
    context = {"files": ["/a", "/b"], "days": 7, "root": "/srv", "name": "it's"}
    rendered = templates.render_value(
        {"files": "{{ files }}", "age": " {{ days * 2 }} ", "path": "{{ root }}/{{ name }}",
         "name": "{{ name }}", "plain": "no template"}, context)
    assert rendered == {"files": ["/a", "/b"], "age": 14, "path": "/srv/it's", "name": "it's",
                        "plain": "no template"}
    with pytest.raises(TemplateError, match="missing"):
        templates.render_value("{{ missing }}", context)
