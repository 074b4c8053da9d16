#!/usr/bin/env bash
# Checks that the sources match the repository's formatting rules:
#   - C++ (src/, include/, bench/): `clang-format` with the nearest .clang-format (the root one;
#     bench/ has its own) would change nothing;
#   - every text file (not expected/*.out: psql pads its columns): no trailing whitespace, no
#     CR, a final newline, and no tab indentation where .editorconfig says spaces (C++, shell,
#     SQL, Python).
# Prints what differs (a unified diff per C++ file, at most FORMAT_DIFF_LINES lines each,
# default 40) and a summary line with the number of lines clang-format would change; exits 1
# if anything differs. Without clang-format the C++ part is skipped with a message
# (scripts/deps.sh installs it). FORMAT_REPORT_ONLY=1 prints the summary and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

failed=0
limit=${FORMAT_DIFF_LINES:-40}

if command -v clang-format >/dev/null; then
    total=0 differ=0 lines=0
    while IFS= read -r f; do
        total=$((total + 1))
        d=$(clang-format --style=file "$f" | diff -u "$f" - || true)
        [ -z "$d" ] && continue
        n=$(grep -E '^[-+]' <<<"$d" | grep -cvE '^(\+\+\+|---) ' || true)
        differ=$((differ + 1))
        lines=$((lines + n))
        if [ -z "${FORMAT_REPORT_ONLY:-}" ]; then
            echo "format: $f: $n lines differ from .clang-format"
            head -n "$limit" <<<"$d"
        fi
    done < <(find src include bench -type f \( -name '*.cpp' -o -name '*.hpp' -o -name '*.h' \) | sort)
    echo "format: $differ of $total C++ files differ from .clang-format ($lines lines would change;" \
         "$(clang-format --version | sed 's/.*version \([0-9.]*\).*/clang-format \1/'))"
    [ "$differ" -eq 0 ] || failed=1
else
    echo "format: clang-format not found, C++ formatting not checked (scripts/deps.sh installs it)"
fi

# .editorconfig rules that hold for every text file.
text_files=$(find . -path ./.git -prune -o -type f \( -name '*.cpp' -o -name '*.hpp' -o -name '*.h' \
    -o -name '*.sh' -o -name '*.sql' -o -name '*.pl' -o -name '*.pm' -o -name '*.py' \
    -o -name '*.md' -o -name '*.json' -o -name '*.conf' -o -name '*.control' -o -name 'Makefile' \
    -o -name '.clang-format' -o -name '.editorconfig' -o -path './.ci/*' \) -print |
    grep -vE '^\./(results|tmp_check|tmp_check_regress|log|bench/results)/' | sort)
for f in $text_files; do
    if grep -qn '[[:blank:]]$' "$f"; then
        echo "format: $f: trailing whitespace on line(s) $(grep -n '[[:blank:]]$' "$f" | cut -d: -f1 | head -5 | tr '\n' ' ')"
        failed=1
    fi
    if grep -q $'\r' "$f"; then echo "format: $f: CR line endings"; failed=1; fi
    if [ -s "$f" ] && [ -n "$(tail -c1 "$f")" ]; then echo "format: $f: no final newline"; failed=1; fi
    case "$f" in
    *.cpp | *.hpp | *.h | *.sh | *.sql | *.py | ./.ci/*)
        if grep -q $'^\t' "$f"; then echo "format: $f: tab indentation (.editorconfig: spaces)"; failed=1; fi
        ;;
    esac
done

if [ -n "${FORMAT_REPORT_ONLY:-}" ]; then exit 0; fi
if [ "$failed" -ne 0 ]; then
    echo "format: FAILED (clang-format -i <file> fixes the C++ formatting)"
    exit 1
fi
echo "format: ok"
