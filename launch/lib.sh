# Shared helpers of the launch scripts (sourced; the caller sets PROG first).

die_usage() {
  echo "$PROG: error: $*" >&2
  echo "run '$PROG --help' for usage" >&2
  exit 2
}

note() { echo "$PROG: $*" >&2; }

# Shell-quote one word: as-is when it is plain, else in single quotes ('\'' for a quote).
quote1() {
  local s="$1"
  if [[ -n "$s" && "$s" != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$s"
  elif [[ "$s" != *"'"* ]]; then
    printf "'%s'" "$s"
  else
    printf "'%s'" "$(printf '%s' "$s" | sed "s/'/'\\\\''/g")"
  fi
}

quote() {
  local out="" a
  for a in "$@"; do out="$out$(quote1 "$a") "; done
  printf '%s' "${out% }"
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
