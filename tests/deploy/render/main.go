// Command render is an APPROXIMATE, helm-less renderer for deploy/helm/mq,
// used by tests/deploy/check_deploy.sh when helm is not installed. It is not
// helm: it implements only what the chart uses (text/template + sprig,
// include, tpl, required, toYaml, fromYaml, .Files.Get,
// .Capabilities.APIVersions.Has, values merged from -f files) so that the
// templates are executed and their output can be validated offline.
//
// Build (Debian 12 packages golang-go, golang-github-masterminds-sprig-dev,
// golang-gopkg-yaml.v3-dev; GOPATH mode, no network):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o render ./tests/deploy/render
//
// Usage: render -chart DIR [-f values.yaml]... [-api-versions G/V/Kind]...
//
//	[-release NAME] [-namespace NS] [-notes FILE]
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v3"
)

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// VersionSet mirrors helm's chartutil.VersionSet.
type VersionSet []string

// Has reports whether the set holds a "group/version" or "group/version/Kind".
func (v VersionSet) Has(s string) bool {
	for _, x := range v {
		if x == s {
			return true
		}
	}
	return false
}

// Files mirrors helm's chart files accessor (only Get).
type Files map[string][]byte

// Get returns a chart file's contents, or "" when it does not exist.
func (f Files) Get(name string) string { return string(f[name]) }

func toYaml(v interface{}) string {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return ""
	}
	return strings.TrimSuffix(buf.String(), "\n")
}

func fromYaml(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := yaml.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

func readYaml(path string) (map[string]interface{}, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	m := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return m, nil
}

// merge deep-merges src into dst as helm merges -f files over values.yaml.
func merge(dst, src map[string]interface{}) map[string]interface{} {
	for k, sv := range src {
		if sv == nil {
			delete(dst, k)
			continue
		}
		sm, sok := sv.(map[string]interface{})
		dm, dok := dst[k].(map[string]interface{})
		if sok && dok {
			dst[k] = merge(dm, sm)
		} else {
			dst[k] = sv
		}
	}
	return dst
}

func loadFiles(chart string) (Files, error) {
	files := Files{}
	err := filepath.Walk(chart, func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(chart, path)
		data, err := os.ReadFile(path)
		files[filepath.ToSlash(rel)] = data
		return err
	})
	return files, err
}

func main() {
	var valueFiles, apiVersions multiFlag
	chart := flag.String("chart", "", "chart directory")
	release := flag.String("release", "mq", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	notes := flag.String("notes", "", "write the rendered NOTES.txt here")
	flag.Var(&valueFiles, "f", "values file (repeatable)")
	flag.Var(&apiVersions, "api-versions", "extra API version for .Capabilities (repeatable)")
	flag.Parse()
	if *chart == "" {
		fmt.Fprintln(os.Stderr, "render: -chart is required")
		os.Exit(2)
	}
	if err := run(*chart, *release, *namespace, *notes, valueFiles, apiVersions); err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(1)
	}
}

func run(chart, release, namespace, notes string, valueFiles, apiVersions []string) error {
	meta, err := readYaml(filepath.Join(chart, "Chart.yaml"))
	if err != nil {
		return err
	}
	values, err := readYaml(filepath.Join(chart, "values.yaml"))
	if err != nil {
		return err
	}
	for _, f := range valueFiles {
		over, err := readYaml(f)
		if err != nil {
			return err
		}
		values = merge(values, over)
	}
	files, err := loadFiles(chart)
	if err != nil {
		return err
	}
	name, _ := meta["name"].(string)
	versions := VersionSet{"v1", "apps/v1", "policy/v1", "batch/v1"}
	versions = append(versions, apiVersions...)
	top := map[string]interface{}{
		"Values": values,
		"Chart": map[string]interface{}{
			"Name": name, "Version": fmt.Sprint(meta["version"]),
			"AppVersion": fmt.Sprint(meta["appVersion"]),
		},
		"Release": map[string]interface{}{
			"Name": release, "Namespace": namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Capabilities": map[string]interface{}{
			"APIVersions": versions,
			"KubeVersion": map[string]interface{}{"Version": "v1.27.0", "Major": "1", "Minor": "27"},
		},
		"Files": files,
	}

	root := template.New("root").Option("missingkey=zero")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	funcs["toYaml"] = toYaml
	funcs["fromYaml"] = fromYaml
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, fmt.Errorf("%s", msg)
		}
		return v, nil
	}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = t.Execute(&buf, data)
		return buf.String(), err
	}
	funcs["lookup"] = func(...interface{}) map[string]interface{} { return map[string]interface{}{} }
	root.Funcs(funcs)

	var names []string
	for rel := range files {
		if strings.HasPrefix(rel, "templates/") {
			names = append(names, rel)
		}
	}
	sort.Strings(names)
	for _, rel := range names {
		full := name + "/" + rel
		if _, err := root.New(full).Parse(string(files[rel])); err != nil {
			return err
		}
	}
	var out bytes.Buffer
	for _, rel := range names {
		base := filepath.Base(rel)
		if strings.HasPrefix(base, "_") {
			continue
		}
		full := name + "/" + rel
		top["Template"] = map[string]interface{}{"Name": full, "BasePath": name + "/templates"}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, full, top); err != nil {
			return err
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if base == "NOTES.txt" {
			if notes != "" {
				if err := os.WriteFile(notes, []byte(text), 0o644); err != nil {
					return err
				}
			}
			continue
		}
		if strings.TrimSpace(text) == "" {
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", full, strings.Trim(text, "\n"))
	}
	_, err = os.Stdout.Write(out.Bytes())
	return err
}
