package main

// OpenAPI definitions for the built-in kinds, derived at start-up by
// reflection over the k8s.io/api Go types (their SwaggerDoc() methods carry
// the descriptions). kube-apiserver ships generated definitions that Debian
// does not package; the generic server needs definitions for every served
// kind (for /openapi/v2, /openapi/v3 and the server-side-apply type
// converter). Lists are atomic for server-side apply; the patch strategy and
// merge key from the Go struct tags are published for kubectl's strategic
// merge patches.

import (
	"reflect"
	"strings"
	"sync"

	extapiserver "k8s.io/apiextensions-apiserver/pkg/apiserver"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	"k8s.io/apimachinery/pkg/runtime"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/kube-openapi/pkg/common"
	"k8s.io/kube-openapi/pkg/util"
	"k8s.io/kube-openapi/pkg/validation/spec"
)

func openAPINamer() *openapinamer.DefinitionNamer {
	return openapinamer.NewDefinitionNamer(extapiserver.Scheme, namerScheme)
}

func openAPIDefinitions() common.GetOpenAPIDefinitions {
	generated := openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions)
	// The server asks several times (per API group install, for v2 and v3);
	// reflection is not free, so remember the result per reference style.
	var mu sync.Mutex
	memo := map[string]map[string]common.OpenAPIDefinition{}
	return func(ref common.ReferenceCallback) map[string]common.OpenAPIDefinition {
		probe := ref("x")
		style := probe.String()
		mu.Lock()
		defer mu.Unlock()
		if defs, ok := memo[style]; ok {
			out := make(map[string]common.OpenAPIDefinition, len(defs))
			for k, v := range defs {
				out[k] = v
			}
			return out
		}
		defs := generated(ref)
		g := &defGen{ref: ref, defs: defs}
		for _, b := range builtins {
			for _, kind := range []string{b.kind, b.kind + "List"} {
				obj, err := Scheme.New(b.gv.WithKind(kind))
				utilMust(err)
				g.named(reflect.TypeOf(obj).Elem())
			}
		}
		memo[style] = defs
		out := make(map[string]common.OpenAPIDefinition, len(defs))
		for k, v := range defs {
			out[k] = v
		}
		return out
	}
}

type defGen struct {
	ref  common.ReferenceCallback
	defs map[string]common.OpenAPIDefinition
}

type schemaTyper interface {
	OpenAPISchemaType() []string
	OpenAPISchemaFormat() string
}

type oneOfTyper interface{ OpenAPIV3OneOfTypes() []string }

var rawExtensionType = reflect.TypeOf(runtime.RawExtension{})

// named returns the definition name of struct type t, generating it (and its
// dependencies) when missing.
func (g *defGen) named(t reflect.Type) string {
	sample := reflect.New(t).Interface()
	name := util.GetCanonicalTypeName(sample)
	if _, ok := g.defs[name]; ok {
		return name
	}
	// placeholder first: types may refer to themselves
	g.defs[name] = common.OpenAPIDefinition{}
	if st, ok := sample.(schemaTyper); ok {
		v2 := spec.Schema{SchemaProps: spec.SchemaProps{Type: st.OpenAPISchemaType(), Format: st.OpenAPISchemaFormat()}}
		v3 := v2
		if oo, ok := sample.(oneOfTyper); ok {
			v3 = spec.Schema{SchemaProps: spec.SchemaProps{OneOf: common.GenerateOpenAPIV3OneOfSchema(oo.OpenAPIV3OneOfTypes()), Format: st.OpenAPISchemaFormat()}}
		}
		g.defs[name] = common.EmbedOpenAPIDefinitionIntoV2Extension(common.OpenAPIDefinition{Schema: v3}, common.OpenAPIDefinition{Schema: v2})
		return name
	}
	docs := swaggerDoc(t)
	s := spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"object"}, Description: docs[""], Properties: map[string]spec.Schema{}}}
	deps := map[string]bool{}
	g.fields(t, &s, deps)
	var depList []string
	for d := range deps {
		depList = append(depList, d)
	}
	g.defs[name] = common.OpenAPIDefinition{Schema: s, Dependencies: depList}
	return name
}

func swaggerDoc(t reflect.Type) map[string]string {
	m := reflect.New(t).Elem().MethodByName("SwaggerDoc")
	if !m.IsValid() {
		return map[string]string{}
	}
	out := m.Call(nil)
	docs, _ := out[0].Interface().(map[string]string)
	if docs == nil {
		docs = map[string]string{}
	}
	return docs
}

// fields adds the JSON properties of struct t (and its inlined structs) to s.
func (g *defGen) fields(t reflect.Type, s *spec.Schema, deps map[string]bool) {
	docs := swaggerDoc(t)
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("json")
		if tag == "-" {
			continue
		}
		parts := strings.Split(tag, ",")
		jsonName := parts[0]
		inline, omitempty := false, false
		for _, p := range parts[1:] {
			inline = inline || p == "inline"
			omitempty = omitempty || p == "omitempty" || p == "omitzero"
		}
		if inline || (f.Anonymous && jsonName == "") {
			ft := f.Type
			if ft.Kind() == reflect.Ptr {
				ft = ft.Elem()
			}
			g.fields(ft, s, deps)
			continue
		}
		if jsonName == "" {
			jsonName = f.Name
		}
		prop := g.schemaFor(f.Type, deps)
		prop.Description = docs[jsonName]
		if ps := f.Tag.Get("patchStrategy"); ps != "" {
			prop.AddExtension("x-kubernetes-patch-strategy", ps)
		}
		if mk := f.Tag.Get("patchMergeKey"); mk != "" {
			prop.AddExtension("x-kubernetes-patch-merge-key", mk)
		}
		s.Properties[jsonName] = prop
		if !omitempty && f.Type.Kind() != reflect.Ptr && f.Type.Kind() != reflect.Slice &&
			f.Type.Kind() != reflect.Map && f.Type.Kind() != reflect.Struct && jsonName != "apiVersion" && jsonName != "kind" {
			s.Required = append(s.Required, jsonName)
		}
	}
}

func (g *defGen) schemaFor(t reflect.Type, deps map[string]bool) spec.Schema {
	for t.Kind() == reflect.Ptr {
		t = t.Elem()
	}
	simple := func(typ, format string) spec.Schema {
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{typ}, Format: format}}
	}
	if t == rawExtensionType || (t.Kind() == reflect.Struct && t.PkgPath() != "") {
		name := g.named(t)
		deps[name] = true
		return spec.Schema{SchemaProps: spec.SchemaProps{Ref: g.ref(name)}}
	}
	switch t.Kind() {
	case reflect.String:
		return simple("string", "")
	case reflect.Bool:
		return simple("boolean", "")
	case reflect.Int8, reflect.Int16, reflect.Int32, reflect.Uint8, reflect.Uint16, reflect.Uint32:
		return simple("integer", "int32")
	case reflect.Int, reflect.Int64, reflect.Uint, reflect.Uint64:
		return simple("integer", "int64")
	case reflect.Float32:
		return simple("number", "float")
	case reflect.Float64:
		return simple("number", "double")
	case reflect.Slice, reflect.Array:
		if t.Elem().Kind() == reflect.Uint8 {
			return simple("string", "byte")
		}
		item := g.schemaFor(t.Elem(), deps)
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"array"}, Items: &spec.SchemaOrArray{Schema: &item}}}
	case reflect.Map:
		val := g.schemaFor(t.Elem(), deps)
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"object"}, AdditionalProperties: &spec.SchemaOrBool{Allows: true, Schema: &val}}}
	}
	// interface{} and anything else: free-form
	s := simple("object", "")
	s.AddExtension("x-kubernetes-preserve-unknown-fields", true)
	return s
}
