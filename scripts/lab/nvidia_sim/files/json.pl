# ---- SIMULATOR for the gpu-fleet lab: minimal JSON reader/writer (perl-base only) ----------
# Inlined at package-build time into the simulated tools that need it. Decodes objects, arrays,
# strings, numbers (kept as their source text), true/false/null; encodes like Go's
# json.MarshalIndent(v, "", "    ") (sorted keys, HTML characters escaped), which is how the
# real nvidia-ctk writes /etc/docker/daemon.json.

package SimJSON;

sub true  { my $v = 1; return bless \$v, 'SimJSON::Bool'; }
sub false { my $v = 0; return bless \$v, 'SimJSON::Bool'; }

sub decode {
    my ($text) = @_;
    my $pos = 0;
    my $value = _value(\$text, \$pos);
    _ws(\$text, \$pos);
    die "invalid JSON: trailing characters at offset $pos\n" if $pos < length($text);
    return $value;
}

sub _ws {
    my ($t, $p) = @_;
    pos($$t) = $$p;
    $$t =~ /\G[ \t\r\n]*/gc;
    $$p = pos($$t);
}

sub _expect {
    my ($t, $p, $re, $what) = @_;
    pos($$t) = $$p;
    if ($$t =~ /\G$re/gc) { $$p = pos($$t); return 1; }
    die "invalid JSON: expected $what at offset $$p\n";
}

sub _string {
    my ($t, $p) = @_;
    _expect($t, $p, qr/"/, 'a string');
    my $out = '';
    pos($$t) = $$p;
    while (1) {
        if ($$t =~ /\G([^"\\]+)/gc) { $out .= $1; next; }
        if ($$t =~ /\G"/gc) { last; }
        if ($$t =~ /\G\\(["\\\/bfnrt])/gc) {
            my %map = ('"' => '"', '\\' => '\\', '/' => '/', b => "\b", f => "\f",
                       n => "\n", r => "\r", t => "\t");
            $out .= $map{$1};
            next;
        }
        if ($$t =~ /\G\\u([0-9a-fA-F]{4})/gc) {
            my $cp = hex($1);
            if ($cp < 0x80) { $out .= chr($cp); }
            elsif ($cp < 0x800) { $out .= chr(0xC0 | ($cp >> 6)) . chr(0x80 | ($cp & 0x3F)); }
            else {
                $out .= chr(0xE0 | ($cp >> 12)) . chr(0x80 | (($cp >> 6) & 0x3F))
                      . chr(0x80 | ($cp & 0x3F));
            }
            next;
        }
        die "invalid JSON: bad string at offset " . pos($$t) . "\n";
    }
    $$p = pos($$t);
    return $out;
}

sub _value {
    my ($t, $p) = @_;
    _ws($t, $p);
    pos($$t) = $$p;
    if ($$t =~ /\G\{/gc) {
        $$p = pos($$t);
        my %h;
        _ws($t, $p);
        pos($$t) = $$p;
        if ($$t =~ /\G\}/gc) { $$p = pos($$t); return \%h; }
        while (1) {
            _ws($t, $p);
            my $k = _string($t, $p);
            _ws($t, $p);
            _expect($t, $p, qr/:/, "':'");
            $h{$k} = _value($t, $p);
            _ws($t, $p);
            pos($$t) = $$p;
            if ($$t =~ /\G,/gc) { $$p = pos($$t); next; }
            if ($$t =~ /\G\}/gc) { $$p = pos($$t); return \%h; }
            die "invalid JSON: expected ',' or '}' at offset $$p\n";
        }
    }
    if ($$t =~ /\G\[/gc) {
        $$p = pos($$t);
        my @a;
        _ws($t, $p);
        pos($$t) = $$p;
        if ($$t =~ /\G\]/gc) { $$p = pos($$t); return \@a; }
        while (1) {
            push @a, _value($t, $p);
            _ws($t, $p);
            pos($$t) = $$p;
            if ($$t =~ /\G,/gc) { $$p = pos($$t); next; }
            if ($$t =~ /\G\]/gc) { $$p = pos($$t); return \@a; }
            die "invalid JSON: expected ',' or ']' at offset $$p\n";
        }
    }
    if ($$t =~ /\G"/gc) { return _string($t, $p); }
    if ($$t =~ /\Gtrue/gc) { $$p = pos($$t); return true(); }
    if ($$t =~ /\Gfalse/gc) { $$p = pos($$t); return false(); }
    if ($$t =~ /\Gnull/gc) { $$p = pos($$t); return undef; }
    if ($$t =~ /\G(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)/gc) {
        $$p = pos($$t);
        my $n = $1;
        return bless \$n, 'SimJSON::Number';
    }
    die "invalid JSON: unexpected character at offset $$p\n";
}

sub _quote {
    my ($s) = @_;
    $s =~ s/\\/\\\\/g;
    $s =~ s/"/\\"/g;
    $s =~ s/\n/\\n/g;
    $s =~ s/\r/\\r/g;
    $s =~ s/\t/\\t/g;
    $s =~ s/([\x00-\x1f])/sprintf('\\u%04x', ord($1))/ge;
    $s =~ s/</\\u003c/g;
    $s =~ s/>/\\u003e/g;
    $s =~ s/&/\\u0026/g;
    return "\"$s\"";
}

sub encode {
    my ($v, $indent) = @_;
    $indent = '' unless defined $indent;
    my $inner = $indent . '    ';
    if (!defined $v) { return 'null'; }
    my $ref = ref $v;
    if ($ref eq 'HASH') {
        my @keys = sort keys %$v;
        return '{}' unless @keys;
        return "{\n" . join(",\n", map { $inner . _quote($_) . ': ' . encode($v->{$_}, $inner) } @keys)
             . "\n$indent}";
    }
    if ($ref eq 'ARRAY') {
        return '[]' unless @$v;
        return "[\n" . join(",\n", map { $inner . encode($_, $inner) } @$v) . "\n$indent]";
    }
    if ($ref eq 'SimJSON::Bool') { return $$v ? 'true' : 'false'; }
    if ($ref eq 'SimJSON::Number') { return $$v; }
    return _quote($v);
}

package main;
# ---- end of SimJSON ----------------------------------------------------------------------------
